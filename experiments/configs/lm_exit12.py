r"""A 12-layer early-exit LM (CALM confidence exits) for operating-point experiments.

Variants: halting=confidence|learned_exit (default confidence), runlocal, gpu, and the
training recipe for exact (self-speculative) decoding: `recipe=current` (exit-aware training
+ exit self-distillation, 0.5 each) or `recipe=layerskip` (LayerSkip: layer dropout rising
with depth to 0.2, early-exit loss only); the default CPU run uses neither.

  python -m experiments.train --config=experiments/configs/lm_exit12.py:recipe=current \
      --workdir=runs/exit12_cur          # 1200 steps
  python -m experiments.benchmark_inference --workdir=runs/exit12_cur --mode=exact

CPU size (d=128, 1200 steps of 16x128 bytes):
  python -m experiments.train --config=experiments/configs/lm_exit12.py --workdir=runs/exit12
  python -m experiments.calibrate --workdir=runs/exit12 --tolerance=0.01 --risk=0.05
  python -m experiments.benchmark_inference --workdir=runs/exit12

`gpu` (d=192, 7.1M params, batch 64, the whole stdlib, 7000 steps; exit-aware training and
exit self-distillation on), trained on an accelerator host, then moved here as .npz files:
  python -m experiments.train --config=experiments/configs/lm_exit12.py:gpu --workdir=/tmp/g
  python -m experiments.transfer --export --workdir=/tmp/g --out=/tmp/g_export   # GPU host
  python -m experiments.transfer --import --src=/tmp/g_export --workdir=runs/exit12_gpu
  python -m experiments.frontier --workdir=runs/exit12_gpu --caps=0,7,8
Training stops after 330 s (train.max_seconds) on slower hosts. What these runs measured
(draft acceptance, exact decoding, the frontier with and without exit-aware training):
docs/results.md ("Early exit, 12 layers", "Exact early exit").
"""
from act_jax import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config()
  config.data.name = 'stdlib'
  config.halting.update(name='confidence', exit_every=1, exit_weights='linear')
  config.model.update(num_layers=12)
  config.train.update(steps=1200, eval_every=600, checkpoint_every=200, warmup_steps=100)
  args = config_lib.parse_arg(arg)
  recipe = args.pop('recipe', None)
  if recipe == 'current':
    config.halting.update(exit_aware=0.5, distill=0.5)
  elif recipe == 'layerskip':
    config.model.update(layer_dropout=0.2)
  elif recipe is not None:
    raise config_lib.ConfigError(f'recipe={recipe!r}: known: current, layerskip')
  if args.pop('gpu', False):  # the accelerator-host size (see the module docstring)
    config.model.update(d_model=192, num_heads=3, d_ff=768)
    # the whole stdlib (~10 MB of code, 0.5 MB of prose): sample mostly code so the small
    # prose domain is not repeated ~100 times
    config.data.update(batch_size=64, max_bytes=50_000_000, code_fraction=0.9)
    config.halting.update(exit_aware=0.5, distill=0.5)
    config.train.update(steps=7000, warmup_steps=300, eval_every=2000, eval_batches=8,
                        checkpoint_every=2000, log_every=250, max_seconds=330.0)
  return config_lib.apply_common_args(config, args)
