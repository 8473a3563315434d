r"""Fewest mean layers at a held-out accuracy tolerance, per depth cap, vs static truncation.

  python -m experiments.frontier --workdir=RUN --tolerance=0.01 --max_layers=0,7,8
The threshold is picked on one half of the held-out batches and reported on the other
(max_layers 0 = no cap). What the README's early-exit table was measured with.
"""
from absl import flags

from experiments import quiet_logs, run

from act_jax.calibrate import operating_point

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_THR = flags.DEFINE_list('thresholds', ['0.99', '0.97', '0.95', '0.93', '0.91', '0.9', '0.89',
                                        '0.87', '0.85', '0.83', '0.8', '0.75', '0.7'],
                         'Candidate thresholds.')
_CAPS = flags.DEFINE_list('max_layers', ['0'], 'Depth caps to compare (0 = none).')
_TOL = flags.DEFINE_float('tolerance', 0.01, 'Max relative accuracy drop.')
_BATCHES = flags.DEFINE_integer('num_batches', 16, 'Held-out batches (half pick, half report).')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  quiet_logs()
  res = operating_point.accuracy_frontier(
      _WORKDIR.value, [float(t) for t in _THR.value],
      [int(c) or None for c in _CAPS.value], _TOL.value, _BATCHES.value)
  print(operating_point.format_frontier(res))


if __name__ == '__main__':
  run(main)
