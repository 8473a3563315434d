r"""Quantization schemes side by side on one run: bytes, speed, accuracy, exits, routing.

  python -m experiments.benchmark_quant --workdir=runs/lm --out=runs/lm_quant \
      --schemes=w8,w4,w8a8,auto --budget_bits=5
Quantizes the run with each scheme into OUT/<scheme> (kept if already there; each also
re-certifies the run's operating point), then measures float32 and every quantized run on the
same held-out test half: model and expert bytes, accuracy at full depth and per exit layer,
the frontier (x fewer layers at <= 1 % drop), tokens whose top-1 expert changed vs float32,
load balance, the certified threshold carried over vs re-certified, and full-depth decoding
speed timed round-robin in this one process. Writes OUT/quant_compare.json.
Measured 2026-12-01 on runs/lm_default (15 min): w8 / w4 / w8a8 / auto(5 bits) at -0.0 /
-0.65 / 0.00 / -0.08 % full-depth accuracy vs float32, frontier 1.62 / 1.59 / 1.62 / 1.61x
fewer layers (float32 1.62x), decode on this CPU 0.83-0.99x of float32 (README
"Quantization" has the table).
"""
from absl import flags

from experiments import quiet_logs, run

from act_jax.quant import ptq

_WORKDIR = flags.DEFINE_string('workdir', None, 'The float training run.')
_OUT = flags.DEFINE_string('out', None, 'Directory for the quantized runs and the table.')
_SCHEMES = flags.DEFINE_list('schemes', ['w8', 'w4', 'w8a8', 'auto'], 'Schemes to compare.')
_BUDGET = flags.DEFINE_float('budget_bits', 5.0, 'auto: mean bits per quantized weight.')
_EXPERTS = flags.DEFINE_bool('experts_only', False, 'Quantize only expert weights.')
_TILE = flags.DEFINE_integer('tile', 32, '4-bit weights: contraction entries per scale.')
_BATCHES = flags.DEFINE_integer('num_batches', 16, 'Held-out batches (half pick, half report).')
_TOKENS = flags.DEFINE_integer('decode_tokens', 32, 'Tokens per timed decode.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds (round-robin over the runs).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  quiet_logs()
  rows = ptq.compare_schemes(_WORKDIR.value, _OUT.value, _SCHEMES.value, _BUDGET.value,
                             _EXPERTS.value, _TILE.value, _BATCHES.value, _TOKENS.value,
                             _REPEATS.value)
  print(ptq.format_compare(rows))


if __name__ == '__main__':
  run(main)
