r"""A 12-layer early-exit LM (CALM confidence exits) for operating-point experiments.

Variants: halting=confidence|learned_exit (default confidence), runlocal, gpu (d=192,
batch 64, whole stdlib, 8000 steps: for an accelerator host; capped at 330 s of training).

  python -m experiments.train --config=experiments/configs/lm_exit12.py --workdir=runs/exit12
  python -m experiments.calibrate --workdir=runs/exit12 --tolerance=0.01 --risk=0.05
  python -m experiments.benchmark_inference --workdir=runs/exit12
Dense FFN, d=128, 1200 steps of 16x128 bytes (~10 min on 2 CPU cores). README lists what
this measured: mean-layer reduction at <= 1% relative accuracy drop, and decode speedups.
"""
from act_jax import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config()
  config.data.name = 'stdlib'
  config.halting.update(name='confidence', exit_every=1, exit_weights='linear')
  config.model.update(num_layers=12)
  config.train.update(steps=1200, eval_every=600, checkpoint_every=200, warmup_steps=100)
  args = config_lib.parse_arg(arg)
  if args.pop('gpu', False):  # the accelerator-host size (see the module docstring)
    config.model.update(d_model=192, num_heads=3, d_ff=768)
    # the whole stdlib (~10 MB of code, 0.5 MB of prose): sample mostly code so the small
    # prose domain is not repeated ~100 times
    config.data.update(batch_size=64, max_bytes=50_000_000, code_fraction=0.9)
    config.train.update(steps=8000, warmup_steps=300, eval_every=2000, eval_batches=8,
                        checkpoint_every=2000, log_every=250, max_seconds=330.0)
  return config_lib.apply_common_args(config, args)
