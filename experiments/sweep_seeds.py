r"""Trains one config under several seeds and prints, per seed, accuracy, steps, Spearman
(steps vs difficulty) and whether the depth collapsed, then the collapse rate.

  python -m experiments.sweep_seeds \
      --config=experiments/configs/synthetic.py:task=parity,halting=act --num_seeds=5 \
      --workdir=runs/sweep_parity_act
  python -m experiments.report --workdir=runs/sweep_parity_act   # steps vs difficulty, a line per seed

Each seed is an ordinary run in WORKDIR/seed_<s> (re-running resumes the unfinished ones);
the table is also written to WORKDIR/sweep.json after every seed (act_jax/train/sweep.py).
"""
import sys

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax import config as config_lib
from act_jax.train import sweep

_CONFIG = vocab.define('config', required=True)
_WORKDIR = vocab.define('workdir', required=True, help='Sweep directory: seed_<s>/ runs + '
                        'sweep.json.')
_SEEDS = vocab.define('num_seeds')
vocab.renamed('seeds', 'num_seeds')
_FIRST = vocab.define('first_seed')


def main(argv):
  del argv
  quiet_logs()
  result = sweep.sweep_seeds(config_lib.honour_explicit(_CONFIG.value, sys.argv), _WORKDIR.value,
                             range(_FIRST.value, _FIRST.value + _SEEDS.value))
  print(sweep.format_sweep(result))


if __name__ == '__main__':
  run(main)
