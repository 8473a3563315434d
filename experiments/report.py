r"""Writes the PNG report of a training run into RUN/report/ (or --out).

  python -m experiments.report --workdir=runs/lm

Training curves, exit-depth histograms, per-byte compute over held-out text, MoE expert
load / domain usage / router entropy / routing stability, and the compute-quality frontier
when RUN/calibration.json exists (see act_jax/viz/report.py).
"""
from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.errors import ConfigError
from act_jax.viz import report

_WORKDIR = vocab.define('workdir', required=True, help='A training run or a sweep directory '
                        '(holds metrics.jsonl or sweep.json).')
_OUT = vocab.define('out', help='Directory for the PNGs (default: WORKDIR/report).')
vocab.renamed('out_dir', 'out')
_BATCHES = vocab.define('num_batches')


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
  paths = report.make_report(_WORKDIR.value, _OUT.value, num_batches=_BATCHES.value)
  print(f'report: {len(paths)} PNG(s) written')


if __name__ == '__main__':
  run(main)
