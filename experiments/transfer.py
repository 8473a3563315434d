r"""Moves a trained run between machines as plain .npz files (see act_jax/deploy/export.py).

  python -m experiments.transfer --export --workdir=RUN --out=DIR     # on the training host
  python -m experiments.transfer --import --src=DIR --workdir=NEWRUN  # where you evaluate
After the import, NEWRUN works with evaluate / calibrate / generate / benchmark_inference.
"""
from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.deploy import export
from act_jax.errors import ConfigError

_EXPORT = vocab.define('export')
_IMPORT = vocab.define('import')
_WORKDIR = vocab.define('workdir', required=True, help='The run: read by --export, created by '
                        '--import.')
_OUT = vocab.define('out', help='--export: the export directory to write.')
_SRC = vocab.define('src')
_MAX_MB = vocab.define('max_file_mb')


def main(argv):
  del argv
  quiet_logs()
  if _EXPORT.value == _IMPORT.value:
    raise ConfigError('give exactly one of --export, --import')
  if _EXPORT.value:
    if not _OUT.value:
      raise ConfigError('--export needs --out=DIR')
    if _SRC.present:
      raise ConfigError(f'--src={_SRC.value}: applies with --import, not --export')
    export.export_run(_WORKDIR.value, _OUT.value, _MAX_MB.value)
  else:
    if not _SRC.value:
      raise ConfigError('--import needs --src=DIR')
    for holder in (_OUT, _MAX_MB):
      if holder.present:
        raise ConfigError(f'--{holder.name}={holder.value}: applies with --export, not '
                          '--import')
    export.import_run(_SRC.value, _WORKDIR.value)


if __name__ == '__main__':
  run(main)
