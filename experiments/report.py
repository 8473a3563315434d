r"""Writes the PNG report of a training run into RUN/report/ (or --out_dir).

  python -m experiments.report --workdir=runs/lm

Training curves, exit-depth histograms, per-byte compute over held-out text, MoE expert
load / domain usage / router entropy / routing stability, and the compute-quality frontier
when RUN/calibration.json exists (see act_jax/viz/report.py).
"""
from absl import app, flags

from experiments import quiet_logs, run

from act_jax.viz import report

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (holds metrics.jsonl).')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where to write PNGs (default WORKDIR/report).')
_BATCHES = flags.DEFINE_integer('num_batches', None,
                                'Held-out batches to run (default config.train.eval_batches).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    paths = report.make_report(_WORKDIR.value, _OUT_DIR.value, num_batches=_BATCHES.value)
  except ValueError as e:  # a clear one-line error and a non-zero exit, not a traceback
    raise SystemExit(f'error: {e}') from None
  print(f'report: {len(paths)} PNG(s) written')


if __name__ == '__main__':
  run(main)
