"""Nearest neighbours on device and the kNN-LM distribution (Khandelwal et al. 2020).

Dims (legend: act_jax/__init__.py): Z flattened query tokens, I datastore entries, O nearest
neighbours per query, D key dimension, V vocabulary.

Search: the O keys nearest to each query in squared L2 distance,
    d(q, k_i) = |q|^2 - (2 q.k_i - |k_i|^2),
ranked by the score s_i = 2 q.k_i - |k_i|^2 (|q|^2 is the same for every key). Keys are
scanned in blocks of `block` entries (the [Z, I] score matrix of a large datastore would not
fit): each block's top O — exact `jax.lax.top_k`, or `jax.lax.approx_max_k` (the TPU's
partial-reduce top-k; on CPU/GPU XLA lowers it to an exact sort) — is merged with the running
top O. `sharded_search` splits the entries over a mesh axis: every device searches its shard,
the per-shard top O are all-gathered (O * shards candidates per query) and the global top O
kept, so a datastore larger than one device's memory is searched where it lies.

kNN distribution and interpolation (kNN-LM, eqs. 2-3):
    p_kNN(y | q) = sum_o 1[v_o = y] exp(-d_o / tau) / sum_o exp(-d_o / tau)
    p(y) = lam * p_kNN(y) + (1 - lam) * p_LM(y)
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

NEG = -jnp.inf


def _block_top(q_ZD, keys_ID, valid_I, num: int, approx: bool, recall_target: float):
  k = keys_ID.astype(jnp.float32)
  # full f32: |q|^2 - s cancels two numbers of size ~D, so TF32 / bf16 passes (the GPU and
  # TPU defaults) would reorder near neighbours
  s_ZI = 2.0 * jnp.dot(q_ZD, k.T, precision=jax.lax.Precision.HIGHEST) - jnp.sum(k * k, -1)[None]
  s_ZI = jnp.where(valid_I[None], s_ZI, NEG)
  if approx:
    return jax.lax.approx_max_k(s_ZI, num, recall_target=recall_target)
  return jax.lax.top_k(s_ZI, num)


def search(q_ZD: jax.Array, keys_ID: jax.Array, num: int, approx: bool = False,
           recall_target: float = 0.95, block: int = 8192,
           valid_I: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """(d_ZO squared L2 distances ascending, idx_ZO int32) of the `num` nearest keys.

  valid_I: entries that may be returned (False: padding, never a neighbour; a query with
  fewer valid entries than num gets d=inf, idx=-1 for the rest)."""
  q = q_ZD.astype(jnp.float32)
  n_i = keys_ID.shape[0]
  valid_I = jnp.ones((n_i,), bool) if valid_I is None else valid_I
  num_eff = min(num, n_i)
  block = max(min(block, n_i), num_eff)
  n_blocks = -(-n_i // block)
  pad = n_blocks * block - n_i
  if pad:
    keys_ID = jnp.pad(keys_ID, ((0, pad), (0, 0)))
    valid_I = jnp.pad(valid_I, (0, pad))
  key_blocks = keys_ID.reshape(n_blocks, block, -1)     # [blocks, block entries, D]
  valid_blocks = valid_I.reshape(n_blocks, block)

  def body(best, xs):
    s_best, i_best = best
    b, k_ID, v_I = xs
    s_blk, i_blk = _block_top(q, k_ID, v_I, num_eff, approx, recall_target)
    s_all = jnp.concatenate([s_best, s_blk], -1)
    i_all = jnp.concatenate([i_best, i_blk.astype(jnp.int32) + b * block], -1)
    s_top, pos = jax.lax.top_k(s_all, num_eff)
    return (s_top, jnp.take_along_axis(i_all, pos, -1)), None

  z = q.shape[0]
  init = (jnp.full((z, num_eff), NEG, jnp.float32), jnp.full((z, num_eff), -1, jnp.int32))
  (s_ZO, idx_ZO), _ = jax.lax.scan(body, init, (jnp.arange(n_blocks), key_blocks,
                                                valid_blocks))
  found = jnp.isfinite(s_ZO)
  d_ZO = jnp.where(found, jnp.maximum(jnp.sum(q * q, -1, keepdims=True) - s_ZO, 0.0), jnp.inf)
  idx_ZO = jnp.where(found, idx_ZO, -1)
  if num_eff < num:
    d_ZO = jnp.pad(d_ZO, ((0, 0), (0, num - num_eff)), constant_values=jnp.inf)
    idx_ZO = jnp.pad(idx_ZO, ((0, 0), (0, num - num_eff)), constant_values=-1)
  return d_ZO, idx_ZO


def lookup(values_I: jax.Array, idx_ZO: jax.Array) -> jax.Array:
  """Neighbours' values (next tokens); -1 where no neighbour was found."""
  return jnp.where(idx_ZO >= 0, jnp.take(values_I, jnp.maximum(idx_ZO, 0)), -1)


def sharded_search(q_ZD: jax.Array, keys_ID: jax.Array, values_I: jax.Array, num: int,
                   mesh: Mesh, axis: str = 'data', approx: bool = False,
                   recall_target: float = 0.95, block: int = 8192
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """search + lookup with the entries split over mesh axis `axis` (queries replicated).

  Returns (d_ZO, idx_ZO global entry index, val_ZO). The entry count must divide evenly over
  the axis (datastore.load pads with invalid entries)."""
  n = mesh.shape[axis]
  if keys_ID.shape[0] % n:
    raise ValueError(f'{keys_ID.shape[0]} datastore entries do not split over {n} devices')

  def local(q, k, v):
    d, i = search(q, k, num, approx, recall_target, block, valid_I=v >= 0)
    vals = lookup(v, i)
    shard = jax.lax.axis_index(axis)
    gi = jnp.where(i >= 0, i + shard * k.shape[0], -1)
    d_all, gi_all, v_all = (jax.lax.all_gather(x, axis, axis=1, tiled=True)
                            for x in (d, gi, vals))
    neg_top, pos = jax.lax.top_k(-d_all, num)
    return (-neg_top, jnp.take_along_axis(gi_all, pos, -1), jnp.take_along_axis(v_all, pos, -1))

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
                     out_specs=(P(), P(), P()), check_vma=False)
  return fn(q_ZD.astype(jnp.float32), keys_ID, values_I)


def knn_probs(d_ZO: jax.Array, val_ZO: jax.Array, vocab: int, temperature) -> jax.Array:
  """p_kNN [Z, V]: softmax(-d / tau) over the neighbours, summed per value (f32). A query
  with no neighbour at all gets all-zero probabilities."""
  found = val_ZO >= 0
  logit_ZO = jnp.where(found, -d_ZO / temperature, NEG)
  top = jnp.max(logit_ZO, -1, keepdims=True)                 # -inf: nothing found
  w_ZO = jnp.where(found, jnp.exp(logit_ZO - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  w_ZO = w_ZO / jnp.maximum(jnp.sum(w_ZO, -1, keepdims=True), 1e-30)
  onehot_ZOV = jax.nn.one_hot(val_ZO, vocab, dtype=jnp.float32)   # -1 -> all zeros
  return jnp.einsum('zo,zov->zv', w_ZO, onehot_ZOV)


def interpolate(lm_logits_ZV: jax.Array, p_knn_ZV: jax.Array, lam) -> jax.Array:
  """log(lam * p_kNN + (1 - lam) * softmax(lm_logits)): log-probabilities, usable as logits
  (softmax of them is the interpolated distribution). A query whose p_kNN is all zero (no
  neighbour) keeps p_LM."""
  p_lm = jax.nn.softmax(lm_logits_ZV.astype(jnp.float32), -1)
  lam = jnp.where(jnp.sum(p_knn_ZV, -1, keepdims=True) > 0, lam, 0.0)
  return jnp.log(jnp.maximum(lam * p_knn_ZV + (1.0 - lam) * p_lm, 1e-30))
