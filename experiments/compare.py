r"""Compares training runs side by side: a table on stdout and OUT/compare.png.

  python -m experiments.compare runs/top_k runs/expert_choice runs/dense --out=runs/compare

Columns: run, halting policy, router, final eval loss / accuracy, mean layers executed vs
full depth, tokens/s, dropped fraction, load imbalance ('-' where a run has no such value).
"""
import os

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.errors import ConfigError
from act_jax.viz import compare

_OUT = vocab.define('out', '.', 'Directory for compare.png (created).')


def main(argv):
  quiet_logs()
  runs = argv[1:]
  if not runs:
    raise ConfigError('give one or more run directories: python -m experiments.compare '
                      'RUN_A RUN_B ... [--out=DIR]')
  if _OUT.value.endswith('.png'):
    raise ConfigError(f'--out={_OUT.value}: --out is a directory (compare.png is written into '
                      'it)')
  table, rows = compare.compare_runs(runs)  # every run read before anything is written
  os.makedirs(_OUT.value, exist_ok=True)
  path = compare.plot_compare(rows, os.path.join(_OUT.value, 'compare.png'))
  print(table)
  print(f'wrote {path}')


if __name__ == '__main__':
  run(main)
