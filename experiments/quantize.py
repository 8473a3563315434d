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

Measured 2026-12-01 on the default run (runs/lm_default, README "Quantization"):
  --scheme=w8: 10.08 -> 2.70 MiB, full-depth accuracy +0.05 %, the certified threshold 0.6
    holds (-0.60 %), re-certified 0.7 (4.43 layers, -0.21 %); ~1.5 min with re-certification.
  --scheme=w4: 1.69 MiB, -0.65 %; --scheme=auto --budget_bits=5: -0.08 % (~2 min more for
    the sensitivities).
"""
from absl import flags

from experiments import quiet_logs, run

from act_jax.quant import ptq

_WORKDIR = flags.DEFINE_string('workdir', None, 'The float (or QAT) training run.')
_OUT = flags.DEFINE_string('out', None, 'Where the quantized run is written (a new directory).')
_SCHEME = flags.DEFINE_string('scheme', None, 'w8 | w4 | w8a8 | auto (default: the scheme a '
                               'quantization-aware run trained with, else w8).')
_EXPERTS = flags.DEFINE_bool('experts_only', False, 'Quantize only expert weights (routed and '
                             'shared), not attention or dense FFNs.')
_GATES = flags.DEFINE_bool('quantize_gates', False, 'Also quantize routers, halting units, exit '
                           'classifiers and the unembedding (ablation; stored quantize-'
                           'dequantized in float32).')
_TILE = flags.DEFINE_integer('tile', 32, '4-bit weights: contraction entries per scale (0: one '
                             'scale per output channel).')
_BUDGET = flags.DEFINE_float('budget_bits', None, '--scheme=auto: mean bits per quantized '
                             'weight, 4..8.')
_RECAL = flags.DEFINE_bool('recalibrate', True, 'Re-certify the run\'s operating point on the '
                           'quantized model (OUT/calibration.json) when the run has one.')
_BATCHES = flags.DEFINE_integer('num_batches', 16, 'Held-out batches (half for auto bits and '
                                'calibration, half to report on).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  quiet_logs()
  ptq.quantize_run(_WORKDIR.value, _OUT.value, _SCHEME.value, _EXPERTS.value, _GATES.value,
                   _TILE.value, _BUDGET.value, _RECAL.value, _BATCHES.value)


if __name__ == '__main__':
  run(main)
