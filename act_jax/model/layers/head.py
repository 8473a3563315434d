"""The shared LM head, and cross-entropy over the vocabulary without [N,B,L,V] logits.

head_logits(head, h) = rms_norm(h) @ W_DV, in f32: the final head and every exit head (CALM's
exits share it; Schuster et al. 2022).

Training an adaptive model needs every exit's loss: CALM's weighted per-exit CE, the exits'
self-distillation KL(p_{N-1} || p_n), PonderNet's sum_n p_n L_n, the learned-exit labels
(does exit n predict what full depth does). Computing them from stacked exit logits costs
N x B x L x V f32 -- and as much again for their gradients: at pod scale (vocabulary 32k,
8 exits) 16 GiB per chip for the logits alone. Here `token_stats` computes them from hidden
states (D << V) instead -- inside the depth scan, one step's state at a time, when the
targets are at hand (the train step), or after it from the exits' states [X,B,L,D] when
self-distillation needs the last exit at every exit:

    for each exit x (a lax.map):                       # one exit at a time
      for each of T length tiles (a lax.map):          # B x L/T tokens at a time
        z = head_logits(head, h[x, :, tile])           # [B, L/T, V] f32, under jax.checkpoint
        ce = logsumexp(z) - z[target];  argmax(z);  KL(p_ref || softmax(z))

Each tile runs under jax.checkpoint, so the forward keeps one tile's logits at a time and
the backward recomputes them (the vocabulary tiling of MaxText's num_vocab_tiling, by token
tiles). Memory: one [B, L/T, V] f32 tile and its gradient, instead of N * B * L * V twice.
Tiles cut the length, not the batch, so each stays spread over the batch's devices.
Cost: the head's matmul runs twice per exit (forward, then recomputed in the backward), as
under remat; self-distillation adds the reference (last) exit's head per exit and tile. The
maths is unchanged: tests/test_exit_loss.py checks losses and gradients against the
stacked-logits path (1e-5, f32) for every policy and option. `tiled_rows` does the same for
a per-token decision read from the head (CALM's confidence, stop_gradient).

`T` is model.loss_tiles (1: all B x L tokens of an exit at once).

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, X exits, T tiles,
S tile length.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from act_jax.model.layers.norms import rms_norm


def head_logits(head: dict, h_BLD: jax.Array) -> jax.Array:
  """Shared output head (final RMSNorm + unembedding) as a pure function, in f32.

  Pure so that exit heads inside the depth scan (CALM) reuse exactly the final head.
  """
  x = rms_norm(h_BLD.astype(jnp.float32), head['norm_scale'])
  return x @ head['unembed_DV'].astype(jnp.float32)


def _length_tiles(tiles: int, l: int) -> tuple[int, int]:
  """(T, S): T tiles of S positions covering the length l (the last one padded)."""
  t = max(1, min(int(tiles), l))
  return t, -(-l // t)


def _pad_length(x_BL: Optional[jax.Array], total: int) -> Optional[jax.Array]:
  if x_BL is None or x_BL.shape[1] == total:
    return x_BL
  return jnp.pad(x_BL, [(0, 0), (0, total - x_BL.shape[1])] + [(0, 0)] * (x_BL.ndim - 2))


def _tile(x_BL: Optional[jax.Array], k: jax.Array, size: int) -> Optional[jax.Array]:
  """Tile k, [B, S, ...], sliced in place: tiles cut the length, not the batch, so each
  stays spread over the devices the batch is sharded over, and nothing is transposed."""
  if x_BL is None:
    return None
  return jax.lax.dynamic_slice_in_dim(x_BL, k * size, size, axis=1)


def tiled_rows(fn, h_BLD: jax.Array, tiles: int = 1) -> jax.Array:
  """fn(h_BSD) -> [B, S] applied to T length tiles of h, one after the other: [B, L]. For a
  per-token decision read from the head (CALM's confidence) without a whole [B, L, V]."""
  b, l = h_BLD.shape[:2]
  t, size = _length_tiles(tiles, l)
  if t == 1:
    return fn(h_BLD)
  h_BLD = _pad_length(h_BLD, t * size)
  out_TBS = jax.lax.map(lambda k: fn(_tile(h_BLD, k, size)), jnp.arange(t))
  return jnp.moveaxis(out_TBS, 0, 1).reshape(b, -1)[:, :l]


def token_stats(head: dict, h_XBLD: jax.Array, targets_BL: jax.Array, tiles: int = 1,
                ref_BLD: Optional[jax.Array] = None, argmax: bool = False
                ) -> dict[str, jax.Array]:
  """Per-token statistics of each exit's head, [X,B,L] each, one tile of logits at a time:
    'ce'      cross-entropy of targets_BL (gradient to h and the head)
    'argmax'  int32 argmax of the logits, when `argmax` (no gradient)
    'kl'      KL(softmax(head(ref)) || softmax(head(h_x))), when ref_BLD is given; the
              reference distribution is held fixed (stop_gradient): self-distillation
  """
  x, b, l, _ = h_XBLD.shape
  t, size = _length_tiles(tiles, l)
  tgt_BL, ref_BLD = _pad_length(targets_BL, t * size), _pad_length(ref_BLD, t * size)

  @jax.checkpoint
  def one(h_BSD: jax.Array, tgt_BS: jax.Array, ref_BSD: Optional[jax.Array]) -> dict:
    z_BSV = head_logits(head, h_BSD)
    lse_BS = jax.nn.logsumexp(z_BSV, axis=-1)
    out = {'ce': lse_BS - jnp.take_along_axis(z_BSV, tgt_BS[..., None], axis=-1)[..., 0]}
    if argmax:
      out['argmax'] = jnp.argmax(jax.lax.stop_gradient(z_BSV), axis=-1).astype(jnp.int32)
    if ref_BSD is not None:
      logp_ref = jax.lax.stop_gradient(jax.nn.log_softmax(head_logits(head, ref_BSD), -1))
      out['kl'] = (jnp.exp(logp_ref) * (logp_ref - (z_BSV - lse_BS[..., None]))).sum(-1)
    return out

  def per_exit(h_BLD: jax.Array) -> dict:
    h_BLD = _pad_length(h_BLD, t * size)
    return jax.lax.map(lambda k: one(_tile(h_BLD, k, size), _tile(tgt_BL, k, size),
                                     _tile(ref_BLD, k, size)), jnp.arange(t))

  out = jax.lax.map(per_exit, h_XBLD)  # [X, T, B, S] each
  return {k: jnp.moveaxis(v, 1, 2).reshape(x, b, -1)[:, :, :l] for k, v in out.items()}
