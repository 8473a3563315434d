r"""Evaluates a trained run: quality and compute per domain / difficulty, at thresholds.

  python -m experiments.evaluate --workdir=runs/parity_act --thresholds=0.5,0.9,0.99
"""
from absl import flags

from experiments import define_max_layers_flag, quiet_logs, run

from act_jax import operating_point

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_THR = flags.DEFINE_list('thresholds', [], 'Thresholds in (0, 1]; empty = the run\'s operating '
                         'point (calibration.json, else the policy default).')
_BATCHES = flags.DEFINE_integer('num_batches', None, 'Held-out batches (default: config).')
_MAX_LAYERS = define_max_layers_flag()
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  quiet_logs()
  operating_point.evaluate_run(_WORKDIR.value, [float(t) for t in _THR.value] or [None],
                               _BATCHES.value, max_layers=_MAX_LAYERS.value)


if __name__ == '__main__':
  run(main)
