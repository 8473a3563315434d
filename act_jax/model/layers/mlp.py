"""Gated MLP (SwiGLU, Shazeer 2020): y = W_out (silu(x W_gate) * (x W_in)).

Dims: B batch, L length, D d_model, F hidden.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from act_jax.model import quant as quant_lib
from act_jax.spec import QuantSpec


class GatedMLP(nn.Module):
  d_ff: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  quant: QuantSpec = quant_lib.NO_QUANT  # weights may be stored quantized (act_jax/model/quant.py)

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    d = x_BLD.shape[-1]
    init = nn.initializers.lecun_normal()
    w_in_DF = self.param('w_in', nn.with_logical_partitioning(init, ('embed', 'mlp')),
                         (d, self.d_ff), self.param_dtype)
    w_gate_DF = self.param('w_gate', nn.with_logical_partitioning(init, ('embed', 'mlp')),
                           (d, self.d_ff), self.param_dtype)
    w_out_FD = self.param('w_out', nn.with_logical_partitioning(init, ('mlp', 'embed')),
                          (self.d_ff, d), self.param_dtype)
    # 2-D matmuls: XLA:CPU runs [B*L, D] @ [D, F] (fwd+bwd) ~1.7x faster than the 3-D form.
    x_ZD = x_BLD.reshape(-1, d).astype(self.dtype)
    mm = lambda x, w: quant_lib.einsum('zd,df->zf', x, quant_lib.cast(w, self.dtype),  # noqa: E731
                                       self.quant)
    h_ZF = nn.silu(mm(x_ZD, w_gate_DF)) * mm(x_ZD, w_in_DF)
    return mm(h_ZF, w_out_FD).reshape(x_BLD.shape[:-1] + (d,))
