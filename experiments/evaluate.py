r"""Evaluates a trained run: quality and compute per domain / difficulty, at thresholds.

  python -m experiments.evaluate --workdir=runs/parity_act --thresholds=0.5,0.9,0.99
  python -m experiments.evaluate --workdir=runs/lm_default --datastore=runs/ds_flax \
      --data_files='.../site-packages/flax/**/*.py' --retrieve=never,always,gate
"""
from absl import flags

from experiments import define_max_layers_flag, quiet_logs, run

from act_jax.calibrate import operating_point
from act_jax.errors import ConfigError
from act_jax.retrieval import datastore

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_THR = flags.DEFINE_list('thresholds', [], 'Thresholds in (0, 1]; empty = the run\'s operating '
                         'point (calibration.json, else the policy default).')
_BATCHES = flags.DEFINE_integer('num_batches', None, 'Held-out batches (default: config).')
_MAX_LAYERS = define_max_layers_flag()
_DATASTORE = flags.DEFINE_string('datastore', None, 'A kNN datastore of this run '
                                 '(experiments.datastore): adds the retrieval arm.')
_RETRIEVE = flags.DEFINE_list('retrieve', ['never', 'always', 'gate'], 'With --datastore: '
                              'retrieval modes to compare (never, always, gate).')
_DATA_FILES = flags.DEFINE_string('data_files', None, 'Evaluate on the held-out split of these '
                                  'files (glob) instead of the run\'s own data.')
_NEIGHBOURS = flags.DEFINE_integer('neighbours', None, 'Neighbours per retrieval (default: '
                                   'the datastore\'s).')
_APPROX = flags.DEFINE_bool('approx', False, 'Search with jax.lax.approx_max_k (TPU).')
_SPREAD = flags.DEFINE_bool('spread', False, 'Held-out windows evenly spaced over the text '
                            'instead of every document\'s beginning first.')
_DEVICES = flags.DEFINE_integer('datastore_devices', 1, 'Split the datastore over this many '
                                'devices (its entries on the data axis; the model replicated).')
_GATE_THR = flags.DEFINE_float('retrieve_threshold', None, 'Gate threshold (default: the '
                               'datastore\'s tuned one).')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  quiet_logs()
  thresholds = [float(t) for t in _THR.value] or [None]
  if not _DATASTORE.value:  # retrieval flags without a datastore would be silently ignored
    for name in ('retrieve', 'neighbours', 'approx', 'retrieve_threshold', 'datastore_devices'):
      if flags.FLAGS[name].present:
        raise ConfigError(f'--{name}={flags.FLAGS[name].value}: applies with --datastore')
  if _SPREAD.value and not (_DATASTORE.value or _DATA_FILES.value):
    raise ConfigError('--spread applies with --datastore or --data_files')
  if _DATASTORE.value or _DATA_FILES.value:
    datastore.evaluate_run(_WORKDIR.value, _DATASTORE.value,
                           _RETRIEVE.value if _DATASTORE.value else ['never'], _DATA_FILES.value,
                           thresholds, _BATCHES.value, _MAX_LAYERS.value, _NEIGHBOURS.value,
                           _APPROX.value, _GATE_THR.value, _SPREAD.value, _DEVICES.value)
    return
  operating_point.evaluate_run(_WORKDIR.value, thresholds, _BATCHES.value,
                               max_layers=_MAX_LAYERS.value)


if __name__ == '__main__':
  run(main)
