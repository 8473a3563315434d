"""Multi-head attention with rotary position embeddings and an explicit KV cache.

RoPE (Su et al. 2021): rotate each (even, odd) feature pair of q and k by angle
pos * base^(-2i/Dh), so q·k depends only on the relative position.
Causal attention masks key positions > query position; bidirectional (encoder) attends to
all valid keys. The KV cache is an explicit array pair (not a hidden collection) so that
early-exit decoding can write the entries of skipped layers itself (inference.py).

Dims (legend: act_jax/__init__.py): B batch, L query length, T key length (cache size),
H heads, J head dim, D d_model.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from act_jax.model import quant as quant_lib
from act_jax.spec import QuantSpec

Cache = dict  # {'k': [B,T,H,J], 'v': [B,T,H,J]}


def apply_rope(x_BLHJ: jax.Array, positions_BL: jax.Array, base: float = 10000.0) -> jax.Array:
  k = x_BLHJ.shape[-1]
  inv_freq = base ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  ang_BLk = positions_BL[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(ang_BLk)[:, :, None, :], jnp.cos(ang_BLk)[:, :, None, :]
  x = x_BLHJ.astype(jnp.float32)
  x1, x2 = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape).astype(x_BLHJ.dtype)


def project_kv(x_BLD: jax.Array, wk_DHJ: jax.Array, wv_DHJ: jax.Array, positions_BL: jax.Array,
               rope_base: float = 10000.0, dtype=jnp.float32,
               quant: QuantSpec = quant_lib.NO_QUANT) -> tuple[jax.Array, jax.Array]:
  """Keys (rotated) and values of x: what later tokens read from a layer.

  A pure function of the two projections so early-exit decoding can fill the KV cache of
  skipped layers without touching (or copying) the rest of their parameters. The weights may
  be stored quantized (act_jax/model/quant.py).
  """
  x = x_BLD.astype(dtype)
  proj = lambda w: quant_lib.einsum('bld,dhk->blhk', x, quant_lib.cast(w, dtype), quant)  # noqa: E731
  return apply_rope(proj(wk_DHJ), positions_BL, rope_base), proj(wv_DHJ)


def init_cache(batch: int, max_len: int, num_heads: int, head_dim: int,
               dtype=jnp.float32) -> Cache:
  z = jnp.zeros((batch, max_len, num_heads, head_dim), dtype)
  return {'k': z, 'v': z}


class Attention(nn.Module):
  num_heads: int
  head_dim: int
  d_model: int
  causal: bool = True
  rope_base: float = 10000.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  quant: QuantSpec = quant_lib.NO_QUANT

  def setup(self):
    # fan-in scaled init; explicit params (not DenseGeneral) so the logical names match ranks.
    init_in = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=0,
                                               out_axis=(1, 2))
    init_out = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                                in_axis=(0, 1), out_axis=2)
    shape_in = (self.d_model, self.num_heads, self.head_dim)
    names_in = ('embed', 'heads', 'kv')
    self.wq_DHJ = self.param('wq', nn.with_logical_partitioning(init_in, names_in), shape_in,
                             self.param_dtype)
    self.wk_DHJ = self.param('wk', nn.with_logical_partitioning(init_in, names_in), shape_in,
                             self.param_dtype)
    self.wv_DHJ = self.param('wv', nn.with_logical_partitioning(init_in, names_in), shape_in,
                             self.param_dtype)
    self.wo = self.param('wo', nn.with_logical_partitioning(init_out, ('heads', 'kv', 'embed')),
                         (self.num_heads, self.head_dim, self.d_model), self.param_dtype)

  def _proj(self, x_BLD, w_DHJ):
    return quant_lib.einsum('bld,dhk->blhk', x_BLD.astype(self.dtype),
                            quant_lib.cast(w_DHJ, self.dtype), self.quant)

  def kv(self, x_BLD: jax.Array, positions_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys (rotated) and values of x: what later tokens read from this layer."""
    return project_kv(x_BLD, self.wk_DHJ, self.wv_DHJ, positions_BL, self.rope_base, self.dtype,
                      self.quant)

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, cache: Optional[Cache] = None,
               cache_index: Optional[jax.Array] = None, key_mask_BT: Optional[jax.Array] = None,
               kv_x_BLD: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[Cache]]:
    """kv_x_BLD: the states keys/values are computed from, when they differ from the
    queries' (exit-aware training: exited tokens expose their exit state, as in decoding)."""
    q_BLHJ = apply_rope(self._proj(x_BLD, self.wq_DHJ), positions_BL, self.rope_base)
    k_BLHJ, v_BLHJ = self.kv(x_BLD if kv_x_BLD is None else kv_x_BLD, positions_BL)
    if cache is not None:
      # Decoding: write this chunk's K/V at cache_index, attend over the filled buffer.
      # cache_index is one position for the batch, or one per row [B] (continuous batching:
      # every row of a serving batch decodes its own request at its own position).
      idx = jnp.asarray(cache_index, jnp.int32)
      b, l, t = x_BLD.shape[0], x_BLD.shape[1], cache['k'].shape[1]
      if idx.ndim == 0:
        k_BTHJ = jax.lax.dynamic_update_slice(cache['k'], k_BLHJ.astype(cache['k'].dtype),
                                              (0, idx, 0, 0))
        v_BTHJ = jax.lax.dynamic_update_slice(cache['v'], v_BLHJ.astype(cache['v'].dtype),
                                              (0, idx, 0, 0))
        end_B1 = jnp.broadcast_to(idx + l, (b, 1))
      else:
        pos_BL = idx[:, None] + jnp.arange(l, dtype=jnp.int32)
        rows_B1 = jnp.arange(b)[:, None]
        k_BTHJ = cache['k'].at[rows_B1, pos_BL].set(k_BLHJ.astype(cache['k'].dtype))
        v_BTHJ = cache['v'].at[rows_B1, pos_BL].set(v_BLHJ.astype(cache['v'].dtype))
        end_B1 = idx[:, None] + l
      cache = {'k': k_BTHJ, 'v': v_BTHJ}
      key_pos_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      filled_BT = key_pos_BT < end_B1
      key_mask_BT = filled_BT if key_mask_BT is None else key_mask_BT & filled_BT
    else:
      k_BTHJ, v_BTHJ, key_pos_BT = k_BLHJ, v_BLHJ, positions_BL
    out_BLD = attend(q_BLHJ, k_BTHJ.astype(self.dtype), v_BTHJ.astype(self.dtype), positions_BL,
                     key_pos_BT, self.causal, key_mask_BT, quant_lib.cast(self.wo, self.dtype),
                     self.quant)
    return out_BLD, cache


def attend(q_BLHJ, k_BTHJ, v_BTHJ, q_pos_BL, k_pos_BT, causal: bool, key_mask_BT, wo_HJD,
           quant: QuantSpec = quant_lib.NO_QUANT):
  """Softmax attention in f32 followed by the output projection."""
  scale = q_BLHJ.shape[-1] ** -0.5
  s_BHLT = jnp.einsum('blhk,bthk->bhlt', q_BLHJ, k_BTHJ,
                      preferred_element_type=jnp.float32) * scale
  mask_BLT = jnp.ones(s_BHLT.shape[:1] + s_BHLT.shape[2:], bool)
  if causal:
    mask_BLT = k_pos_BT[:, None, :] <= q_pos_BL[:, :, None]
  if key_mask_BT is not None:
    mask_BLT = mask_BLT & key_mask_BT[:, None, :]
  s_BHLT = jnp.where(mask_BLT[:, None], s_BHLT, -1e30)
  p_BHLT = jax.nn.softmax(s_BHLT, axis=-1).astype(v_BTHJ.dtype)
  o_BLHJ = jnp.einsum('bhlt,bthk->blhk', p_BHLT, v_BTHJ)
  return quant_lib.einsum('blhk,hkd->bld', o_BLHJ, wo_HJD, quant)
