r"""Fewest mean layers at a held-out accuracy tolerance, per depth cap, vs static truncation.

  python -m experiments.frontier --workdir=RUN --tolerance=0.01 --caps=0,7,8
The threshold is picked on one half of the held-out batches and reported on the other
(cap 0 = none). docs/calibration.md explains the table; docs/results.md has measured ones.
"""
from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.calibrate import frontier

_WORKDIR = vocab.define('workdir', required=True)
_THR = vocab.define('thresholds', ['0.99', '0.97', '0.95', '0.93', '0.91', '0.9', '0.89', '0.87',
                                   '0.85', '0.83', '0.8', '0.75', '0.7'],
                    'Candidate thresholds in (0, 1].')
_CAPS = vocab.define('caps', ['0'], 'Depth caps to compare, exit layers (0 = no cap).')
vocab.renamed('max_layers', 'caps')
_TOL = vocab.define('tolerance', help='Max relative accuracy drop.')
_BATCHES = vocab.define('num_batches', 16, 'Held-out batches (half pick, half report).')


def main(argv):
  del argv
  quiet_logs()
  res = frontier.accuracy_frontier(_WORKDIR.value, _THR.value,
                                          [c or None for c in _CAPS.value], _TOL.value,
                                          _BATCHES.value)
  print(frontier.format_frontier(res))


if __name__ == '__main__':
  run(main)
