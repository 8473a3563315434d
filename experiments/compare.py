r"""Compares training runs side by side: a table on stdout and a PNG.

  python -m experiments.compare runs/top_k runs/expert_choice runs/dense --out=compare.png

Columns: run, halting policy, router, final eval loss / accuracy, mean layers executed vs
full depth, tokens/s, dropped fraction, load imbalance ('-' where a run has no such value).
"""
from absl import app, flags

from experiments import quiet_logs, run

from act_jax.viz import compare

_OUT = flags.DEFINE_string('out', 'compare.png', 'Where to write the comparison PNG.')


def main(argv):
  quiet_logs()
  runs = argv[1:]
  if not runs:
    raise app.UsageError('give one or more run directories: python -m experiments.compare '
                         'RUN_A RUN_B ...')
  try:
    table, _ = compare.compare_runs(runs, out=_OUT.value)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  print(table)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  run(main)
