r"""Quantization schemes side by side on one run: bytes, speed, accuracy, exits, routing.

  python -m experiments.benchmark_quant --workdir=runs/lm --out=runs/lm_quant \
      --schemes=w8,w4,w8a8,auto --budget_bits=5
Quantizes the run with each scheme into OUT/<scheme> (kept if already there; each also
re-certifies the run's operating point), then measures float32 and every quantized run on the
same held-out test half: model and expert bytes, accuracy at full depth and per exit layer,
the frontier (x fewer layers at <= 1 % drop), tokens whose top-1 expert changed vs float32,
load balance, the certified threshold carried over vs re-certified, and full-depth decoding
speed timed round-robin in this one process. Writes OUT/quant_compare.json. Measured tables:
docs/results.md.
"""
from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.quant import ptq

_WORKDIR = vocab.define('workdir', required=True, help='The float training run.')
_OUT = vocab.define('out', required=True, help='Directory for the quantized runs and the table.')
_SCHEMES = vocab.define('schemes', ['w8', 'w4', 'w8a8', 'auto'])
_BUDGET = vocab.define('budget_bits', 5.0)
_EXPERTS = vocab.define('experts_only')
_TILE = vocab.define('tile')
_BATCHES = vocab.define('num_batches', 16, 'Held-out batches (half pick, half report).')
_NEW = vocab.define('max_new_tokens', 32, 'Bytes per timed decode.')
vocab.renamed('decode_tokens', 'max_new_tokens')
_REPEATS = vocab.define('repeats', help='Timed rounds (round-robin over the runs).')


def main(argv):
  del argv
  quiet_logs()
  rows = ptq.compare_schemes(_WORKDIR.value, _OUT.value, _SCHEMES.value, _BUDGET.value,
                             _EXPERTS.value, _TILE.value, _BATCHES.value, _NEW.value,
                             _REPEATS.value)
  print(ptq.format_compare(rows))


if __name__ == '__main__':
  run(main)
