r"""Times one MoE layer (forward + backward) per router / dispatch path against a dense FFN.

Example:
  python -m experiments.benchmark_moe --num_experts=8,32,128 --tokens=4096 --d_model=256 \
      --d_ff=512 --top_k=2 --capacity_factor=1.25 --repeats=5

The logic lives in act_jax.bench.moe.run_benchmark (callable from Colab); see its docstring for
what is measured and why the dense reference has hidden top_k * d_ff.
"""
from experiments import run
from experiments import vocabulary as vocab

from act_jax.bench import moe as bench
from act_jax.errors import ConfigError

_NUM_EXPERTS = vocab.define('num_experts')
_TOKENS = vocab.define('tokens')
_SEQ_LEN = vocab.define('seq_len')
_D_MODEL = vocab.define('d_model')
_D_FF = vocab.define('d_ff')
_TOP_K = vocab.define('top_k')
_CF = vocab.define('capacity_factor')
_REPEATS = vocab.define('repeats')
_CASES = vocab.define('cases', [f'{r}:{d}' for r, d in bench.DEFAULT_CASES])


def main(argv: list[str]) -> None:
  del argv
  if _TOKENS.value % _SEQ_LEN.value:
    raise ConfigError(f'--tokens={_TOKENS.value}: must be a multiple of '
                      f'--seq_len={_SEQ_LEN.value}')
  if _TOP_K.value > min(_NUM_EXPERTS.value):
    raise ConfigError(f'--top_k={_TOP_K.value}: at most the fewest experts '
                      f'(--num_experts={",".join(map(str, _NUM_EXPERTS.value))})')
  cases = [tuple(c.split(':')) for c in _CASES.value]
  rows = bench.run_benchmark(
      num_experts=_NUM_EXPERTS.value, tokens=_TOKENS.value,
      seq_len=_SEQ_LEN.value, d_model=_D_MODEL.value, d_ff=_D_FF.value, top_k=_TOP_K.value,
      capacity_factor=_CF.value, repeats=_REPEATS.value, cases=cases)
  print()
  print(bench.format_table(rows))


if __name__ == '__main__':
  run(main)
