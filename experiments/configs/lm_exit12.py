r"""A 12-layer early-exit LM (CALM confidence exits) for operating-point experiments.

Variants: halting=confidence|learned_exit (default confidence), runlocal.

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
  return config_lib.apply_common_args(config, config_lib.parse_arg(arg))
