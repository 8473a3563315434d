r"""Moves a trained run between machines as plain .npz files (see act_jax/deploy/export.py).

  python -m experiments.transfer --export --workdir=RUN --out=DIR     # on the training host
  python -m experiments.transfer --import --src=DIR --workdir=NEWRUN  # where you evaluate
After the import, NEWRUN works with evaluate / calibrate / generate / benchmark_inference.
"""
from absl import app, flags

from experiments import quiet_logs, run

from act_jax.deploy import export

_EXPORT = flags.DEFINE_bool('export', False, 'Write RUN\'s latest checkpoint to --out.')
_IMPORT = flags.DEFINE_bool('import', False, 'Build --workdir from the export at --src.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training workdir (read or created).')
_OUT = flags.DEFINE_string('out', None, 'Export directory to write.')
_SRC = flags.DEFINE_string('src', None, 'Export directory to read.')
_MAX_MB = flags.DEFINE_float('max_file_mb', 15.0, 'Largest .npz file written.')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  quiet_logs()
  if _EXPORT.value == _IMPORT.value:
    raise app.UsageError('give exactly one of --export, --import')
  if _EXPORT.value:
    if not _OUT.value:
      raise app.UsageError('--export needs --out=DIR')
    export.export_run(_WORKDIR.value, _OUT.value, _MAX_MB.value)
  else:
    if not _SRC.value:
      raise app.UsageError('--import needs --src=DIR')
    export.import_run(_SRC.value, _WORKDIR.value)


if __name__ == '__main__':
  run(main)
