r"""Times one MoE layer (forward + backward) per router / dispatch path against a dense FFN.

Example:
  python experiments/benchmark_moe.py --num_experts=8,32,128 --tokens=4096 --d_model=256 \
      --d_ff=512 --top_k=2 --capacity_factor=1.25 --repeats=5

The logic lives in act_jax.bench.moe.run_benchmark (callable from Colab); see its docstring for
what is measured and why the dense reference has hidden top_k * d_ff.
"""
from absl import flags

from experiments import run

from act_jax.bench import moe as bench

_NUM_EXPERTS = flags.DEFINE_list('num_experts', ['8', '32', '128'], 'expert counts E')
_TOKENS = flags.DEFINE_integer('tokens', 4096, 'tokens per step (batch * seq_len)')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 512, 'sequence length = routing group size')
_D_MODEL = flags.DEFINE_integer('d_model', 256, 'model width D')
_D_FF = flags.DEFINE_integer('d_ff', 512, 'expert hidden size F')
_TOP_K = flags.DEFINE_integer('top_k', 2, 'experts per token K')
_CF = flags.DEFINE_float('capacity_factor', 1.25, 'capacity factor')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed repeats (median)')
_CASES = flags.DEFINE_list(
    'cases', [f'{r}:{d}' for r, d in bench.DEFAULT_CASES],
    'router:dispatch pairs, e.g. top_k:gather,top_k:einsum')


def main(argv: list[str]) -> None:
  del argv
  cases = [tuple(c.split(':')) for c in _CASES.value]
  rows = bench.run_benchmark(
      num_experts=[int(e) for e in _NUM_EXPERTS.value], tokens=_TOKENS.value,
      seq_len=_SEQ_LEN.value, d_model=_D_MODEL.value, d_ff=_D_FF.value, top_k=_TOP_K.value,
      capacity_factor=_CF.value, repeats=_REPEATS.value, cases=cases)
  print()
  print(bench.format_table(rows))


if __name__ == '__main__':
  run(main)
