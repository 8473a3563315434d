"""RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * scale, computed in f32.

Dims: B batch, L length, D d_model.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Pure function so the shared LM head can be applied inside the depth scan."""
  x32 = x_BLD.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale_D.astype(jnp.float32)).astype(x_BLD.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    scale_D = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                         (x_BLD.shape[-1],), self.param_dtype)
    return rms_norm(x_BLD, scale_D, self.eps)
