"""Moving tokens to expert buffers and back, and the batched expert MLP.

Dims (legend: act_jax/__init__.py): G groups, S tokens per group, E experts, C capacity,
K choices per token, D d_model, F expert d_ff, Y = E*C flat slots, P = E*num_slots soft-MoE
slots, R buffer rows (E-major: G*C; dropless: Q*U); dropless: Z = G*S tokens, M = Z*K
assignments, Q blocks of U rows.

Experts are gated MLPs (same as the dense FFN), run as ONE batched matmul over stacked weights:
  y_e(x) = (silu(x W_gate[e]) * (x W_in[e])) W_out[e].

Interchangeable paths (equal to float rounding; tests check it):
* 'gather' (default): x_GECD[g,e,c] = x_GSD[g, token_for_slot[g,e,c]] (0 for an empty slot);
  token-choice plans combine by gathering, per token, the K rows (expert, slot) it went to:
  y_s = sum_k w_sk * out[e_sk, c_sk]  -- O(G*S*K*D), no scatter in the forward; expert-choice
  plans combine by a weighted scatter-add over the slots.
* 'gather' for router='dropless': sort assignments by expert into blocks of U rows and run a
  block-sparse matmul (MegaBlocks-style, Gale et al. 2023) -- no [E, S] buffers.
* 'ragged' (token-choice routers): assignments sorted by expert, grouped matmuls with
  jax.lax.ragged_dot -- no [E, C] buffers; the accelerator path. Under a device mesh it is
  expert-parallel (act_jax/model/moe/expert_parallel.py: each device sorts its own tokens
  and exchanges them with ragged all-to-alls); without one, `ragged_forward` sorts all
  groups together. Expert-choice plans have no token side and use 'gather'.
* 'einsum' (GShard, Lepikhin et al. 2021 / flaxformer reference): one-hot dispatch tensor
  dispatch_GSEC and combine_GSEC = dispatch * weight; x_GECD = einsum(dispatch, x),
  y_GSD = einsum(combine, out). O(G*S*E*C*D): the reference, not the fast path.
* Soft MoE (Puigcerver et al. 2023) is dense in both: slots = dispatch^T X, y = combine . out.

Sharding: expert buffers are constrained to ('expert_group', 'expert', None, 'embed') around
the expert matmul, so each device multiplies only its own experts' slots by its own experts'
weights. With LOGICAL_RULES mapping 'batch' to 'data' only, tokens are replicated over the
'expert' mesh axis: the dispatch is then a local slice and the combine an all-reduce over
'expert'; were 'batch' also split over 'expert', the same constraint lowers to all-to-alls.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from act_jax.model import quant as quant_lib
from act_jax.model.moe import expert_parallel
from act_jax.model.moe.routers import RoutingPlan, SoftPlan
from act_jax.scale.sharding import constrain
from act_jax.spec import QuantSpec

NO_QUANT = quant_lib.NO_QUANT

BUFFER_NAMES = ('expert_group', 'expert', None, 'embed')
EMAJOR_NAMES = ('expert', 'expert_group', None, 'embed')


def expert_mlp(x_GECD: jax.Array, w_in_EDF: jax.Array, w_gate_EDF: jax.Array,
               w_out_EFD: jax.Array, quant: QuantSpec = NO_QUANT) -> jax.Array:
  """All experts' gated MLPs as batched matmuls over the stacked weights (float, or stored
  quantized: act_jax/model/quant.py).

  Runs expert-major ([E, G*C, D]): XLA:CPU's batched dot wants the batch dim leading; the
  two buffer transposes cost far less than the strided dots they avoid (measured:
  docs/results.md).
  """
  g, e_, c_, d = x_GECD.shape
  x_GECD = constrain(x_GECD, BUFFER_NAMES)
  x_EGCD = constrain(x_GECD.transpose(1, 0, 2, 3), EMAJOR_NAMES)
  x_ERD = x_EGCD.reshape(e_, g * c_, d)
  gate_ERF = quant_lib.einsum('erd,edf->erf', x_ERD, w_gate_EDF, quant)
  up_ERF = quant_lib.einsum('erd,edf->erf', x_ERD, w_in_EDF, quant)
  h_ERF = jax.nn.silu(gate_ERF) * up_ERF
  y_ERD = quant_lib.einsum('erf,efd->erd', h_ERF, w_out_EFD, quant)
  y_EGCD = constrain(y_ERD.reshape(e_, g, c_, d), EMAJOR_NAMES)
  return constrain(y_EGCD.transpose(1, 0, 2, 3), BUFFER_NAMES)


# ----------------------------------------------------------------------------- gather path

def gather_dispatch(x_GSD: jax.Array, token_for_slot_GEC: jax.Array) -> jax.Array:
  """x_GECD[g,e,c] = x_GSD[g, token_for_slot[g,e,c]]; empty slots (-1) read zeros."""
  g, e_, c_ = token_for_slot_GEC.shape
  idx_GY = token_for_slot_GEC.reshape(g, e_ * c_)
  # mode='fill' turns -1 into a zero row without materialising a padded copy of x.
  take = jax.vmap(lambda x_SD, i_Y: jnp.take(x_SD, i_Y, axis=0, mode='fill', fill_value=0))
  return take(x_GSD, idx_GY).reshape(g, e_, c_, x_GSD.shape[-1])


def gather_combine(y_GECD: jax.Array, plan: RoutingPlan, num_tokens: int) -> jax.Array:
  """Weighted sum of each token's expert outputs back in token order."""
  g, e_, c_, d = y_GECD.shape
  y_GYD = y_GECD.reshape(g, e_ * c_, d)
  if plan.slot_index_GSK is not None:
    # Token-choice: gather the K rows each token was sent to (faster than scatter on CPU).
    kept_GSK = plan.slot_index_GSK >= 0
    flat_GSK = jnp.where(kept_GSK, plan.expert_index_GSK * c_ + plan.slot_index_GSK, 0)
    s, k = flat_GSK.shape[1:]
    rows_GMD = jax.vmap(lambda y, i: jnp.take(y, i, axis=0))(y_GYD, flat_GSK.reshape(g, s * k))
    w_GSK = plan.combine_weight_GSK.astype(y_GECD.dtype)  # already 0 where dropped
    return jnp.einsum('gskd,gsk->gsd', rows_GMD.reshape(g, s, k, d), w_GSK)
  # Expert-choice: a token can sit in 0..E slots, so scatter-add the weighted slot outputs.
  w_GY1 = plan.weight_GEC.reshape(g, e_ * c_, 1).astype(y_GECD.dtype)
  tok_GY = jnp.where(plan.token_for_slot_GEC >= 0, plan.token_for_slot_GEC,
                     num_tokens).reshape(g, e_ * c_)
  add = jax.vmap(lambda z, i, v: z.at[i].add(v, mode='drop'))
  return add(jnp.zeros((g, num_tokens, d), y_GECD.dtype), tok_GY, y_GYD * w_GY1)


# ----------------------------------------------------------------------------- dropless

def dropless_block_size(num_assignments: int, num_experts: int) -> int:
  """Rows per block: a power of two near half the mean expert load, in [8, 512].

  Smaller blocks waste fewer padded rows (<= E*(P-1) in total) but gather one weight copy
  per block; half the mean load balances the two on CPU.
  """
  target = max(1, num_assignments // (2 * num_experts))
  return int(min(512, max(8, 1 << (target.bit_length() - 1))))


def dropless_forward(x_GSD: jax.Array, expert_index_GSK: jax.Array,
                     combine_weight_GSK: jax.Array, weights: tuple[jax.Array, ...],
                     num_experts: int, block: int | None = None,
                     quant: QuantSpec = NO_QUANT) -> jax.Array:
  """Dropless top-k without capacity padding: sort by expert, block-sparse matmul.

  The M assignments are sorted by expert (one sort, like MegaBlocks, Gale et al. 2023) and
  each expert's run is padded to a multiple of U, so every block belongs to one expert; the
  static bound Q = ceil(M/U) + E covers any load. Block q multiplies by W[expert(q)] (a
  gather of Q weight copies), and each (token, k) reads its row back. Compute is at most
  (M + E*U) rows instead of E*S per group for the C = S capacity buffer. Routing is over
  all groups at once (no capacity, so groups do not matter); under a 'data' mesh this
  gathers the tokens, so dropless is meant for single-host runs.
  """
  g, s, d = x_GSD.shape
  k = expert_index_GSK.shape[-1]
  e_, t, m = num_experts, g * s, g * s * k
  p = block or dropless_block_size(m, e_)
  q = -(-m // p) + e_
  r = q * p
  x_ZD = x_GSD.reshape(t, d)
  e_M = expert_index_GSK.reshape(m)
  key_M = jnp.where(e_M >= 0, e_M, e_)                      # halted -> pseudo-expert E
  sorted_M, src_M = jax.lax.sort_key_val(key_M, jnp.arange(m, dtype=jnp.int32))
  counts_E = jnp.zeros((e_ + 1,), jnp.int32).at[key_M].add(1)[:e_]
  padded_E = -(-counts_E // p) * p
  pstart_E = jnp.cumsum(padded_E) - padded_E                # first row of each expert
  start_E = jnp.cumsum(counts_E) - counts_E                 # first sorted index of each
  se_M = jnp.minimum(sorted_M, e_ - 1)
  row_sorted_M = jnp.where(sorted_M < e_, pstart_E[se_M] + jnp.arange(m) - start_E[se_M], r)
  token_R = jnp.full((r,), -1, jnp.int32).at[row_sorted_M].set(src_M // k, mode='drop')
  x_QUD = jnp.take(x_ZD, token_R, axis=0, mode='fill', fill_value=0).reshape(q, p, d)
  # Expert of each block; unused tail blocks (all padding) borrow expert E-1 on zero rows.
  block_e_Q = jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(q) * p, side='right')
  block_e_Q = jnp.minimum(block_e_Q, e_ - 1)
  w_in_QDF, w_gate_QDF, w_out_QFD = (quant_lib.take(w, block_e_Q, axis=0) for w in weights)
  mm = lambda eq, x, w: quant_lib.einsum(eq, x, w, quant)  # noqa: E731
  h_QUF = (jax.nn.silu(mm('qud,qdf->quf', x_QUD, w_gate_QDF))
           * mm('qud,qdf->quf', x_QUD, w_in_QDF))
  y_RD = mm('quf,qfd->qud', h_QUF, w_out_QFD).reshape(r, d)
  row_M = jnp.zeros((m,), jnp.int32).at[src_M].set(row_sorted_M)   # undo the sort
  y_MD = jnp.take(y_RD, row_M, axis=0, mode='fill', fill_value=0)  # halted: row r -> 0
  w_ZK = combine_weight_GSK.reshape(t, k).astype(y_RD.dtype)
  return jnp.einsum('zkd,zk->zd', y_MD.reshape(t, k, d), w_ZK).reshape(g, s, d)


# ----------------------------------------------------------------------------- ragged

def ragged_forward(x_GSD: jax.Array, plan: RoutingPlan, weights: tuple[jax.Array, ...],
                   num_experts: int, quant: QuantSpec = NO_QUANT) -> jax.Array:
  """Token-choice experts as grouped matmuls: sort the kept (token, choice) assignments by
  expert and run jax.lax.ragged_dot (one grouped GEMM per weight, the MegaBlocks / MaxText
  'sparse matmul' form; Mosaic's grouped-matmul kernel on TPU, cuBLAS grouped GEMM on GPU).

  Same routing, capacity and combine weights as 'gather' (dropped and halted assignments go
  to a pseudo-expert E past the last group, so they cost no rows); no [E, C] buffers and no
  padding. Assignments of all groups are sorted together: the one-device form. Under a mesh
  `moe_forward` runs act_jax/model/moe/expert_parallel.py instead (each device sorts its
  own tokens; a global sort here would move token rows between chips: 27.5 GiB of
  temporaries for pod.py:size=1b on v5e:4x4, docs/results.md).
  """
  g, s, d = x_GSD.shape
  k = plan.expert_index_GSK.shape[-1]
  m = g * s * k
  kept_M = (plan.slot_index_GSK >= 0).reshape(m)
  key_M = jnp.where(kept_M, plan.expert_index_GSK.reshape(m), num_experts)
  _, src_M = jax.lax.sort_key_val(key_M, jnp.arange(m, dtype=jnp.int32))
  sizes_E = jnp.zeros((num_experts + 1,), jnp.int32).at[key_M].add(1)[:num_experts]
  x_MD = jnp.take(x_GSD.reshape(g * s, d), src_M // k, axis=0)
  w_in_EDF, w_gate_EDF, w_out_EFD = weights
  h_MF = (jax.nn.silu(quant_lib.ragged_dot(x_MD, w_gate_EDF, sizes_E, quant))
          * quant_lib.ragged_dot(x_MD, w_in_EDF, sizes_E, quant))
  y_MD = quant_lib.ragged_dot(h_MF, w_out_EFD, sizes_E, quant)
  # Undo the sort; rows past the last group (dropped / halted) are not computed: zero them.
  y_MD = jnp.zeros_like(y_MD).at[src_M].set(y_MD)
  y_MD = jnp.where(kept_M[:, None], y_MD, 0)
  w_GSK = plan.combine_weight_GSK.astype(y_MD.dtype)
  return jnp.einsum('gskd,gsk->gsd', y_MD.reshape(g, s, k, d), w_GSK)


# ----------------------------------------------------------------------------- einsum path

def one_hot_dispatch(token_for_slot_GEC: jax.Array, num_tokens: int) -> jax.Array:
  """dispatch_GSEC[g,s,e,c] = 1 iff token s fills slot (e, c)."""
  s_S = jnp.arange(num_tokens, dtype=jnp.int32)
  return (token_for_slot_GEC[:, None, :, :] == s_S[None, :, None, None])


def einsum_dispatch(x_GSD: jax.Array, plan: RoutingPlan) -> jax.Array:
  dispatch_GSEC = one_hot_dispatch(plan.token_for_slot_GEC, x_GSD.shape[1]).astype(x_GSD.dtype)
  return jnp.einsum('gsec,gsd->gecd', dispatch_GSEC, x_GSD)


def einsum_combine(y_GECD: jax.Array, plan: RoutingPlan, num_tokens: int) -> jax.Array:
  dispatch_GSEC = one_hot_dispatch(plan.token_for_slot_GEC, num_tokens)
  combine_GSEC = dispatch_GSEC * plan.weight_GEC[:, None].astype(y_GECD.dtype)
  return jnp.einsum('gsec,gecd->gsd', combine_GSEC, y_GECD)


# ----------------------------------------------------------------------------- soft MoE

def soft_moe(x_GSD: jax.Array, plan: SoftPlan, weights: tuple[jax.Array, ...],
             num_experts: int, quant: QuantSpec = NO_QUANT) -> jax.Array:
  """slots = dispatch^T X; out = expert(slots); y = combine . out (Puigcerver et al. 2023)."""
  g, s, d = x_GSD.shape
  n = plan.dispatch_GSP.shape[-1]
  dt = x_GSD.dtype
  slots_GPD = jnp.einsum('gsp,gsd->gpd', plan.dispatch_GSP.astype(dt), x_GSD)
  out_GECD = expert_mlp(slots_GPD.reshape(g, num_experts, n // num_experts, d), *weights,
                        quant=quant)
  return jnp.einsum('gsp,gpd->gsd', plan.combine_GSP.astype(dt), out_GECD.reshape(g, n, d))


def moe_forward(x_GSD: jax.Array, plan: Any, weights: tuple[jax.Array, ...], mode: str,
                num_experts: int, dropless: bool = False,
                quant: QuantSpec = NO_QUANT) -> jax.Array:
  """Routed-experts output y_GSD for a plan; weights = (w_in_EDF, w_gate_EDF, w_out_EFD).

  dropless=True with mode='gather' uses the sorted block-sparse path (the plan's C = S
  buffers are then only used by the einsum reference).
  """
  if isinstance(plan, SoftPlan):
    return soft_moe(x_GSD, plan, weights, num_experts, quant)
  s = x_GSD.shape[1]
  if mode == 'ragged':
    if plan.slot_index_GSK is not None:
      mesh = expert_parallel.ambient_mesh(x_GSD.shape[0])
      if mesh is not None:
        return expert_parallel.forward(x_GSD, plan, weights, num_experts, mesh, quant)
      return ragged_forward(x_GSD, plan, weights, num_experts, quant)
    mode = 'gather'  # expert choice has no token side to sort
  if mode == 'gather' and dropless:
    return dropless_forward(x_GSD, plan.expert_index_GSK, plan.combine_weight_GSK, weights,
                            num_experts, quant=quant)
  if mode == 'gather':
    return gather_combine(expert_mlp(gather_dispatch(x_GSD, plan.token_for_slot_GEC), *weights,
                                     quant=quant), plan, s)
  if mode == 'einsum':
    return einsum_combine(expert_mlp(einsum_dispatch(x_GSD, plan), *weights, quant=quant),
                          plan, s)
  raise ValueError(f'unknown dispatch {mode!r}')
