"""Speed of one MoE layer (forward + backward) relative to a dense FFN with the same ACTIVE size.

Dims: B batch, L length (one routing group per sequence), D d_model, F expert d_ff, E experts,
K top-k.

Each routed token runs K experts of hidden F, so the reference is a dense gated FFN of hidden
K*F (same active parameters / FLOPs per token). A top-K layer does cf times the dense expert
FLOPs (capacity padding), so cf (1.25) is the floor of the ratio; router, dispatch and combine
are the overhead measured here. Soft MoE gets num_slots = C per expert (same slot count as
top-K's buffers); hash uses K = 1 (half the active compute of the dense reference).
Time = median over `repeats` of a jitted value_and_grad call (block_until_ready, one warm-up);
the dense reference is timed interleaved with each case and the ratio is the median of the
per-pair ratios, so load from other processes on a shared CPU cancels out. For dropless the
C column shows the block size U of its sorted block-sparse path.

What grows with E is not routing but the expert weights: 3*E*D*F params are read in the
forward, read twice and written as gradients in the backward, and each expert's matmul has
only T*K*cf/E rows. Measured tables (dated, with hardware): docs/results.md.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from act_jax import config as config_lib
from act_jax.model.layers.mlp import GatedMLP
from act_jax.model.moe.dispatch import dropless_block_size
from act_jax.model.moe.layer import MoEFFN
from act_jax.model.moe.routers import ROUTERS, capacity

DEFAULT_CASES: tuple[tuple[str, str], ...] = (
    ('top_k', 'gather'), ('top_k', 'einsum'), ('dropless', 'gather'),
    ('expert_choice', 'gather'), ('expert_choice', 'einsum'), ('soft', 'gather'),
    ('hash', 'gather'))


class DenseFFN(nn.Module):
  """Dense reference: the library's GatedMLP on the flattened [B*L, D] tokens.

  Flattening matters on XLA:CPU: the [B, L, D] matmuls' weight gradients run slower,
  and the reference should be the fastest dense layer, not a handicapped one.
  """
  d_ff: int

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    b, l, d = x_BLD.shape
    return GatedMLP(self.d_ff, name='mlp')(x_BLD.reshape(b * l, d)).reshape(b, l, d)


def _time_pair(fn: Callable[[], Any], ref: Callable[[], Any], repeats: int
               ) -> tuple[float, float, float]:
  """(median s of fn, median s of ref, median of per-pair ratios), runs interleaved.

  Interleaving makes the ratio robust to load from other processes on a shared CPU.
  """
  jax.block_until_ready(fn())   # warm-up (compile)
  jax.block_until_ready(ref())
  t_fn, t_ref = [], []
  for _ in range(repeats):
    for f, out in ((fn, t_fn), (ref, t_ref)):
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      out.append(time.perf_counter() - t0)
  ratios = [a / b for a, b in zip(t_fn, t_ref)]
  return statistics.median(t_fn), statistics.median(t_ref), statistics.median(ratios)


def _fwd_bwd(module: Any, x_BLD: jax.Array, extra: dict[str, Any], rng: jax.Array
             ) -> Callable[[], Any]:
  variables = module.init(rng, x_BLD, **extra)
  params = variables['params']
  rest = {k: v for k, v in variables.items() if k != 'params'}
  cot_BLD = jax.random.normal(jax.random.key(7), x_BLD.shape, x_BLD.dtype)

  def loss(p: Any, x: jax.Array) -> jax.Array:
    out = module.apply({'params': p, **rest}, x, **extra)
    y = out[0] if isinstance(out, tuple) else out
    return jnp.sum(y * cot_BLD)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda: step(params, x_BLD)


def run_benchmark(num_experts: Sequence[int] = (8, 32, 128), tokens: int = 4096,
                  seq_len: int = 512, d_model: int = 256, d_ff: int = 512, top_k: int = 2,
                  capacity_factor: float = 1.25, repeats: int = 5,
                  cases: Sequence[tuple[str, str]] = DEFAULT_CASES,
                  log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
  """Rows {E, router, dispatch, C, ms, dense_ms, us_per_token, ratio}; ratio = time / dense."""
  if tokens % seq_len:
    raise ValueError(f'tokens={tokens} must be a multiple of seq_len={seq_len}')
  b = tokens // seq_len
  x_BLD = jax.random.normal(jax.random.key(0), (b, seq_len, d_model), jnp.float32)
  ids_BL = jax.random.randint(jax.random.key(1), (b, seq_len), 0, 32000)
  dense_step = _fwd_bwd(DenseFFN(d_ff * top_k), x_BLD, {}, jax.random.key(2))
  rows = []
  for e_ in num_experts:
    c_ = capacity(seq_len, e_, top_k, capacity_factor)
    for router, disp in cases:
      cfg = config_lib.moe_spec(router=router, num_experts=e_, top_k=top_k,
                                capacity_factor=capacity_factor, dispatch=disp, d_ff=d_ff,
                                num_slots=c_)
      module = MoEFFN(cfg, d_model=d_model, d_ff=d_ff, causal=False)
      info = ROUTERS[router]
      extra = {'token_ids_BL': ids_BL} if info.scores == 'token_ids' else {}
      step = _fwd_bwd(module, x_BLD, extra, jax.random.key(3))
      t, t_dense, ratio = _time_pair(step, dense_step, repeats)
      # dropless+gather has no capacity: its C column shows the block size U instead.
      c_col = (f'U={dropless_block_size(tokens * top_k, e_)}'
               if info.dropless and disp == 'gather' else c_)
      row = dict(E=e_, router=router, dispatch=disp, C=c_col,
                 ms=1e3 * t, dense_ms=1e3 * t_dense, us_per_token=1e6 * t / tokens,
                 ratio=ratio)
      rows.append(row)
      if log:
        log(f'E={e_:4d} {router:14s} {disp:7s} C/U={row["C"]!s:>5} {row["ms"]:9.1f} ms '
            f'(dense {row["dense_ms"]:.1f} ms) {ratio:6.2f}x dense')
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = [f'{"E":>4} {"router":14} {"dispatch":8} {"C":>5} {"ms":>9} {"us/tok":>8} '
           f'{"dense ms":>9} {"x dense":>8}']
  for r in rows:
    lines.append(f'{r["E"]:>4} {r["router"]:14} {r["dispatch"]:8} {r["C"]!s:>5} '
                 f'{r["ms"]:>9.1f} {r["us_per_token"]:>8.2f} {r["dense_ms"]:>9.1f} '
                 f'{r["ratio"]:>8.2f}')
  return '\n'.join(lines)
