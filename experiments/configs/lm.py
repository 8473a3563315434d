r"""Byte-level language model on the embedded corpus (Python stdlib code + its English docs).

Default = the adaptive model: CALM confidence exits (halting=confidence) + a top-2 MoE FFN
every other layer (8 experts of hidden 192: the same active parameters as the dense FFN of
hidden 384). Variants (':arg', comma-separated): halting=<policy>, router=<router>, runlocal.

  python -m experiments.train --config=experiments/configs/lm.py --workdir=runs/lm
    6 layers, d=128, 700 steps of 16x128 bytes, exits trained exit-aware and self-distilled,
    then the operating point certified at <= 1 % relative accuracy drop (train.certify_tolerance).
  python -m experiments.train --config=experiments/configs/lm.py:halting=none,router=none \
      --workdir=runs/dense        # the dense fixed-depth baseline
  python -m experiments.train --config=experiments/configs/lm.py --config.quant.scheme=w4 \
      --workdir=runs/lm_qat_w4    # quantization-aware (int4 weights, float master copy)
    then experiments.quantize --scheme=w4.
  python -m experiments.train --config=experiments/configs/lm.py --config.moe.shared_experts=1 \
      --workdir=runs/lm_shared    # + one always-on shared expert: the generalist of moe.fallback
  python -m experiments.train --config=experiments/configs/lm.py:runlocal --workdir=/tmp/lm
    tiny (seconds); used by the tests.
What these runs measured: docs/results.md ("The default run", "Quantization", "Retrieval and
fallback").
"""
from act_jax import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config()
  config.data.name = 'stdlib'
  config.halting.name = 'confidence'
  config.moe.update(router='top_k', num_experts=8, top_k=2, every=2, d_ff=192)
  config.train.update(steps=700, eval_every=350, checkpoint_every=100)
  args = config_lib.parse_arg(arg)
  if not args.get('runlocal'):  # end at a certified point: <= 1 % relative accuracy drop
    config.train.certify_tolerance = 0.01
  config = config_lib.apply_common_args(config, args)
  # what the 12-layer runs showed makes exits usable (docs: operating points): train the
  # exits on the states they will see (exit-aware) and toward full depth (distillation).
  # Where supported: on for the early-exit policies, off for the others, so that
  # --config.halting.name=act (or any policy) trains as one flag away from this config.
  config.halting.update(exit_aware=0.5, distill=0.5, where_supported='exit_aware,distill')
  return config
