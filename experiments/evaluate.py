r"""Evaluates a trained run: quality and compute per domain / difficulty, at thresholds.

  python -m experiments.evaluate --workdir=runs/parity_act --thresholds=0.5,0.9,0.99
  python -m experiments.evaluate --workdir=runs/lm_default --datastore=runs/ds_flax \
      --files='.../site-packages/flax/**/*.py' --retrieve_modes=never,always,gate
"""
from absl import flags

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.calibrate import operating_point
from act_jax.errors import ConfigError
from act_jax.retrieval import datastore

_WORKDIR = vocab.define('workdir', required=True)
_THR = vocab.define('thresholds', [], 'Thresholds in (0, 1] (default: the run\'s operating '
                    'point: calibration.json, else the policy default).')
_BATCHES = vocab.define('num_batches')
_MAX_LAYERS = vocab.define('max_layers')
_DATASTORE = vocab.define('datastore', help='A kNN datastore of this run '
                          '(experiments.datastore): adds the retrieval arm.')
_RETRIEVE = vocab.define('retrieve_modes')
vocab.renamed('retrieve', 'retrieve_modes')
_FILES = vocab.define('files', help='Evaluate on the held-out split of these files (glob) '
                      'instead of the run\'s own data.')
vocab.renamed('data_files', 'files')
_NEIGHBOURS = vocab.define('neighbours')
_APPROX = vocab.define('approx')
_SPREAD = vocab.define('spread')
_DEVICES = vocab.define('datastore_devices')
_GATE_THR = vocab.define('retrieve_threshold')


def main(argv):
  del argv
  quiet_logs()
  thresholds = _THR.value or [None]
  if not _DATASTORE.value:  # retrieval flags without a datastore would be silently ignored
    for name in ('retrieve_modes', 'neighbours', 'approx', 'retrieve_threshold',
                 'datastore_devices'):
      if flags.FLAGS[name].present:
        raise ConfigError(f'--{name}={flags.FLAGS[name].value}: applies with --datastore')
  if _SPREAD.value and not (_DATASTORE.value or _FILES.value):
    raise ConfigError('--spread applies with --datastore or --files')
  if _DATASTORE.value or _FILES.value:
    datastore.evaluate_run(_WORKDIR.value, _DATASTORE.value,
                           _RETRIEVE.value if _DATASTORE.value else ['never'], _FILES.value,
                           thresholds, _BATCHES.value, _MAX_LAYERS.value, _NEIGHBOURS.value,
                           _APPROX.value, _GATE_THR.value, _SPREAD.value, _DEVICES.value)
    return
  operating_point.evaluate_run(_WORKDIR.value, thresholds, _BATCHES.value,
                               max_layers=_MAX_LAYERS.value)


if __name__ == '__main__':
  run(main)
