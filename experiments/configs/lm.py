r"""Byte-level language model on the embedded corpus (Python stdlib code + its English docs).

Variants (':arg', comma-separated): halting=<policy>, router=<router>, runlocal.

  python -m experiments.train --config=experiments/configs/lm.py --workdir=runs/lm
    6 layers, d=128, 1000 steps of 16x128 bytes: ~4-5 min on 2 CPU cores; held-out loss
    falls from 5.6 (uniform over 260) to about 1.9 nats/byte (see README for measured numbers).
  python -m experiments.train --config=experiments/configs/lm.py:runlocal --workdir=/tmp/lm
    tiny (seconds); used by the tests.
"""
from act_jax import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.default_config()
  config.data.name = 'stdlib'
  return config_lib.apply_common_args(config, config_lib.parse_arg(arg))
