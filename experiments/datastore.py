r"""Builds the kNN datastore of a trained run over any text or code (act_jax/retrieval).

  python -m experiments.datastore --workdir=runs/lm_default \
      --files='/path/to/site-packages/flax/**/*.py' --out=runs/ds_flax --max_bytes=100000
Keys are the run's states at every exit step, values the next bytes, of the train split of
the files (the held-out split is what `evaluate --files` scores); a tenth of the train
documents tunes the interpolation and trains the retrieval gate. Killed, it resumes where it
stopped. docs/retrieval.md explains it; docs/results.md has measured build times.
"""
from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.retrieval import datastore

_WORKDIR = vocab.define('workdir', required=True, help='The trained run whose states are the '
                        'keys.')
_FILES = vocab.define('files', required=True)
_OUT = vocab.define('out', required=True, help='Datastore directory (created; resumed if '
                    'unfinished).')
_MAX_BYTES = vocab.define('max_bytes')
_TUNE = vocab.define('tune_fraction')
_NEIGHBOURS = vocab.define('neighbours', 16, 'Neighbours per retrieval (tuning, and the default '
                           'at inference).')
_CHUNK = vocab.define('chunk_windows')


def main(argv):
  del argv
  quiet_logs()
  datastore.build(_WORKDIR.value, _FILES.value, _OUT.value, max_bytes=_MAX_BYTES.value,
                  tune_fraction=_TUNE.value, chunk_windows=_CHUNK.value,
                  neighbours=_NEIGHBOURS.value)


if __name__ == '__main__':
  run(main)
