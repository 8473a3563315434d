r"""Post-training quantization of a run (int8 / int4 with qwix): writes a quantized run.

  python -m experiments.quantize --workdir=runs/lm --out=runs/lm_w8 --scheme=w8
  python -m experiments.quantize --workdir=runs/lm --out=runs/lm_w4e --scheme=w4 --experts_only
  python -m experiments.quantize --workdir=runs/lm --out=runs/lm_auto --scheme=auto \
      --budget_bits=5
Schemes: w8, w4, w8a8 (int8 activations too), auto (8 or 4 bits per expert and per layer
from held-out sensitivity, under --budget_bits mean bits per quantized weight). Routers,
halting units, exit heads and norms stay float32 unless --quantize_gates (the ablation).
Every binary (evaluate, calibrate, frontier, generate, benchmark_inference, serve, report,
transfer) reads OUT like any run. The run's certified operating point is checked on the
quantized model (a warning when it no longer holds) and re-certified: OUT/calibration.json.
Training with quantization-aware training instead: --config.quant.scheme=w8|w4 on train.
docs/quantization.md explains the schemes; docs/results.md has measured sizes, accuracy and
times.
"""
from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.quant import ptq

_WORKDIR = vocab.define('workdir', required=True, help='The float (or QAT) training run.')
_OUT = vocab.define('out', required=True, help='Where the quantized run is written (a new '
                    'directory).')
_SCHEME = vocab.define('scheme', help='Weight scheme (default: the scheme a quantization-aware '
                       'run trained with, else w8).')
_EXPERTS = vocab.define('experts_only')
_GATES = vocab.define('quantize_gates')
_TILE = vocab.define('tile')
_BUDGET = vocab.define('budget_bits')
_RECAL = vocab.define('recalibrate')
_BATCHES = vocab.define('num_batches', 16, 'Held-out batches (half for auto bits and '
                        'calibration, half to report on).')


def main(argv):
  del argv
  quiet_logs()
  ptq.quantize_run(_WORKDIR.value, _OUT.value, _SCHEME.value, _EXPERTS.value, _GATES.value,
                   _TILE.value, _BUDGET.value, _RECAL.value, _BATCHES.value)


if __name__ == '__main__':
  run(main)
