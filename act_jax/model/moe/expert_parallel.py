"""Expert-parallel dispatch for token-choice routers: each device sorts its own tokens by
expert, sends them to the devices that hold those experts, runs grouped matmuls there, and
sends the results back (GShard's all-to-all, Lepikhin et al. 2021; MaxText's 'sparse matmul'
form with ragged all-to-all and grouped GEMMs).

Dims (legend: act_jax/__init__.py): G groups, S tokens per group, K choices, E experts,
D d_model, F expert d_ff; per device: M = G_loc*S*K assignments, N = mesh 'expert' size
(the peers), X = E/N local experts, U = rows a device may send to one peer, Y = N*U rows of
a send or receive buffer.

Inside `jax.shard_map` over the whole mesh, tokens split over the batch axes
(act_jax.scale.sharding.BATCH_AXES, which include 'expert') and expert weights split over
'expert' (their d_model gathered, their hidden units left split over 'model'):

1. sort the M (token, choice) assignments by expert; dropped and halted ones get the key E
   and are never sent;
2. pack them into a send buffer of N chunks of U rows: chunk j holds, in expert order, the
   rows for peer j's experts;
3. exchange the per-expert counts [N, X] (one small all-to-all), then the rows:
   * TPU / GPU: `jax.lax.ragged_all_to_all` moves only each chunk's filled rows;
   * CPU (XLA:CPU has no ragged-all-to-all): `jax.lax.all_to_all` moves the whole padded
     chunks. Both leave peer i's rows at rows [i*U, i*U + count) of the receive buffer, so
     everything after the exchange is the same program, and the CPU path tests it;
4. sort the received rows by local expert and run the gated MLP as three
   `jax.lax.ragged_dot` grouped matmuls (with 'model' > 1, a psum over 'model' completes
   the output projection);
5. undo the sort, send the rows back the same way, and combine y_s = sum_k w_sk y_sk.

U is a static bound that never drops an assignment the router kept:
  U = min(M, G_loc * X * C)
(a peer holds X experts, each takes at most C = the plan's capacity per group from each of
this device's G_loc groups). With top_k's capacity C = ceil(K S cf / E), the buffers hold
N*U = cf * M rows: the same as the 'gather' path's E*C slots per group. The dropless router
(C = S) has no such bound, so its buffers take the worst case N*M rows.

Same routing, drops and combine weights as 'gather' (tests/test_moe_sharding.py checks
outputs and gradients to 1e-5 on 8 CPU devices; tests/test_aot.py that the TPU program
contains ragged-all-to-all). Without a mesh, or when the groups do not split over the
batch axes (decoding a few rows), `dispatch.ragged_forward` sorts all groups in one place.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from act_jax.model import quant as quant_lib
from act_jax.model.moe.routers import RoutingPlan
from act_jax.scale.sharding import BATCH_AXES
from act_jax.spec import QuantSpec

NO_QUANT = quant_lib.NO_QUANT
AXIS = 'expert'
TRANSPORTS = ('ragged', 'padded')


def ambient_mesh(num_groups: int) -> Any | None:
  """The mesh to split over, or None: no mesh set, one device, an axis already manual (we
  are inside another shard_map), or groups that do not divide over the batch axes."""
  get = getattr(jax.sharding, 'get_abstract_mesh', None)
  mesh = get() if get else None
  if mesh is None or getattr(mesh, 'empty', True) or mesh.size == 1:
    return None
  if any(a not in mesh.shape for a in BATCH_AXES + (AXIS, 'model')):
    return None
  if getattr(mesh, 'manual_axes', ()):
    return None
  if num_groups % math.prod(mesh.shape[a] for a in BATCH_AXES):
    return None
  return mesh


def transport_for(mesh: Any) -> str:
  """'ragged' where XLA implements ragged-all-to-all (TPU, GPU), else 'padded'."""
  device = getattr(mesh, 'abstract_device', None)
  platform = getattr(device, 'platform', None) or jax.default_backend()
  return 'ragged' if platform in ('tpu', 'gpu', 'cuda', 'rocm') else 'padded'


def send_rows(groups: int, tokens: int, k: int, num_experts: int, peers: int,
              capacity: int) -> int:
  """U: rows one device may send one peer (module docstring), for G_loc = groups."""
  return max(1, min(groups * tokens * k, groups * (num_experts // peers) * capacity))


def forward(x_GSD: jax.Array, plan: RoutingPlan, weights: tuple[Any, ...], num_experts: int,
            mesh: Any, quant: QuantSpec = NO_QUANT, transport: str | None = None
            ) -> jax.Array:
  """Routed-experts output y_GSD, expert-parallel over `mesh` (module docstring)."""
  transport = transport or transport_for(mesh)
  if transport not in TRANSPORTS:
    raise ValueError(f'transport={transport!r}: one of {TRANSPORTS}')
  peers, model = mesh.shape[AXIS], mesh.shape['model']
  g = x_GSD.shape[0] // math.prod(mesh.shape[a] for a in BATCH_AXES)
  s, k = plan.expert_index_GSK.shape[1:]
  u = send_rows(g, s, k, num_experts, peers, plan.token_for_slot_GEC.shape[-1])
  kept_GSK = plan.slot_index_GSK >= 0
  key_GSK = jnp.where(kept_GSK, plan.expert_index_GSK, num_experts).astype(jnp.int32)
  w_GSK = jnp.where(kept_GSK, plan.combine_weight_GSK, 0).astype(x_GSD.dtype)
  if quant_lib.is_quantized(weights[0]):
    # A stored QArray: gather it whole per expert (its scale's layout is the scheme's).
    w_specs, split_model = (P(AXIS),) * 3, False
  else:
    w_specs = (P(AXIS, None, 'model'), P(AXIS, None, 'model'), P(AXIS, 'model', None))
    split_model = model > 1
  tok = P(BATCH_AXES)
  local = functools.partial(_local, peers=peers, experts=num_experts, rows=u,
                            transport=transport, split_model=split_model, quant=quant)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_specs), out_specs=tok,
                     check_vma=False)
  return fn(x_GSD, key_GSK, w_GSK, tuple(weights))


def _exchange(buf_YD: jax.Array, send_N: jax.Array, recv_N: jax.Array, peers: int,
              rows: int, transport: str) -> jax.Array:
  """Peer j gets chunk j of buf (its first send_N[j] rows); the result holds peer i's rows
  at [i*rows, i*rows + recv_N[i])."""
  d = buf_YD.shape[-1]
  if transport == 'padded':
    out_NUD = jax.lax.all_to_all(buf_YD.reshape(peers, rows, d), AXIS, 0, 0)
    return out_NUD.reshape(peers * rows, d)
  start_N = jnp.arange(peers, dtype=jnp.int32) * rows
  me = jax.lax.axis_index(AXIS).astype(jnp.int32)
  return jax.lax.ragged_all_to_all(buf_YD, jnp.zeros_like(buf_YD), start_N,
                                   send_N.astype(jnp.int32),
                                   jnp.full((peers,), me * rows, jnp.int32),
                                   recv_N.astype(jnp.int32), axis_name=AXIS)


def _local(x_GSD: jax.Array, key_GSK: jax.Array, w_GSK: jax.Array,
           weights: tuple[Any, ...], *, peers: int, experts: int, rows: int, transport: str,
           split_model: bool, quant: QuantSpec) -> jax.Array:
  """One device's part: its tokens, its X = E/N experts' weights (module docstring)."""
  g, s, d = x_GSD.shape
  k = key_GSK.shape[-1]
  m, x_, y = g * s * k, experts // peers, peers * rows
  # 1. sort assignments by expert (key E = not sent: dropped or halted)
  key_M = key_GSK.reshape(m)
  sorted_M, src_M = jax.lax.sort_key_val(key_M, jnp.arange(m, dtype=jnp.int32))
  count_E = jnp.zeros((experts + 1,), jnp.int32).at[key_M].add(1)[:experts]
  send_N = count_E.reshape(peers, x_).sum(1)
  first_N = jnp.cumsum(send_N) - send_N                     # first sorted index per peer
  peer_M = jnp.minimum(sorted_M, experts - 1) // x_
  row_M = jnp.where(sorted_M < experts,
                    peer_M * rows + jnp.arange(m, dtype=jnp.int32) - first_N[peer_M], y)
  # 2. the send buffer: chunk j = rows for peer j, in expert order (fill: zeros)
  token_Y = jnp.full((y,), -1, jnp.int32).at[row_M].set(src_M // k, mode='drop')
  send_YD = jnp.take(x_GSD.reshape(g * s, d), token_Y, axis=0, mode='fill', fill_value=0)
  # 3. counts, then rows
  recv_NX = jax.lax.all_to_all(count_E.reshape(peers, x_), AXIS, 0, 0)
  recv_N = recv_NX.sum(1)
  recv_YD = _exchange(send_YD, send_N, recv_N, peers, rows, transport)
  # 4. sort received rows by local expert (padding rows get X: last) and run the experts
  pos_Y = jnp.arange(y, dtype=jnp.int32)
  ends_YX = jnp.cumsum(recv_NX, axis=1)[pos_Y // rows]
  local_Y = jnp.sum((pos_Y % rows)[:, None] >= ends_YX, axis=1).astype(jnp.int32)
  _, perm_Y = jax.lax.sort_key_val(local_Y, pos_Y)
  xs_YD = jnp.take(recv_YD, perm_Y, axis=0)
  sizes_X = recv_NX.sum(0)
  w_in_XDF, w_gate_XDF, w_out_XFD = weights
  h_YF = (jax.nn.silu(quant_lib.ragged_dot(xs_YD, w_gate_XDF, sizes_X, quant))
          * quant_lib.ragged_dot(xs_YD, w_in_XDF, sizes_X, quant))
  ys_YD = quant_lib.ragged_dot(h_YF, w_out_XFD, sizes_X, quant)
  if split_model:
    ys_YD = jax.lax.psum(ys_YD, 'model')
  # 5. back to receive order, back to the senders, back to token order; combine
  back_YD = _exchange(jnp.zeros_like(ys_YD).at[perm_Y].set(ys_YD), recv_N, send_N, peers,
                      rows, transport)
  row_of_M = jnp.zeros((m,), jnp.int32).at[src_M].set(row_M)      # row y = not sent -> 0
  y_MD = jnp.take(back_YD, row_of_M, axis=0, mode='fill', fill_value=0)
  return jnp.einsum('gskd,gsk->gsd', y_MD.reshape(g, s, k, d), w_GSK)


__all__ = ['TRANSPORTS', 'ambient_mesh', 'forward', 'send_rows', 'transport_for']
