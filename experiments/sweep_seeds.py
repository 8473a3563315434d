r"""Trains one config under several seeds and prints, per seed, accuracy, steps, Spearman
(steps vs difficulty) and whether the depth collapsed, then the collapse rate.

  python -m experiments.sweep_seeds \
      --config=experiments/configs/synthetic.py:task=parity,halting=act --seeds=5 \
      --workdir=runs/sweep_parity_act
  python -m experiments.report --workdir=runs/sweep_parity_act   # steps vs difficulty, a line per seed

Each seed is an ordinary run in WORKDIR/seed_<s> (re-running resumes the unfinished ones);
the table is also written to WORKDIR/sweep.json after every seed (act_jax/train/sweep.py).
"""
import sys

from absl import flags

from experiments import quiet_logs, run
from ml_collections import config_flags

from act_jax import config as config_lib
from act_jax.train import sweep
from act_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory: seed_<s>/ runs + sweep.json.')
_SEEDS = flags.DEFINE_integer('seeds', 5, 'How many seeds: first_seed, first_seed + 1, ...')
_FIRST = flags.DEFINE_integer('first_seed', 0, 'The first seed.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  quiet_logs()
  if _SEEDS.value < 1:
    raise ConfigError(f'--seeds={_SEEDS.value}: must be at least 1')
  if _FIRST.value < 0:
    raise ConfigError(f'--first_seed={_FIRST.value}: must be non-negative')
  result = sweep.sweep_seeds(config_lib.honour_explicit(_CONFIG.value, sys.argv), _WORKDIR.value,
                             range(_FIRST.value, _FIRST.value + _SEEDS.value))
  print(sweep.format_sweep(result))


if __name__ == '__main__':
  run(main)
