"""Mixture-of-Depths routing (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating
compute in transformer-based language models") as pure functions for the model's block.

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps.

Per block a router scores each token, r_t = w·h_t (the model computes router_logit_BL). The k
highest-scoring running tokens of each sequence go through the block, the others pass by the
residual unchanged:

    h'_t = h_t + σ(r_t) · f(h_t)   if t ∈ top-k(r)            else   h'_t = h_t

k_b = ceil(capacity · n_b), n_b = number of running (valid) tokens in row b, computed with a
1e-4 tolerance so that 0.3·10 gives 3 (not 4 from float rounding) and clipped to [min(1,n_b), n_b]:
any capacity > 0 routes at least one token of a non-empty row; capacity 1 routes all of them.
Ties are broken by position (earlier token first).

Gate choice: Raposo multiply f(h) by r directly; we use σ(r) ∈ (0,1) so that the block's
contribution stays bounded (r is unbounded and can flip the sign of the update) while the router
still receives gradient through the gate. Top-k over the sequence is non-causal, so for
autoregressive decoding an auxiliary predictor logit (computed by the model on stop_gradient(h))
is trained with BCE on "was in the top-k" (`mod_predictor_loss`) and routes a token at decode
time when σ(pred) ≥ 0.5 (`mod_decode_select`).

The `mod` halting policy itself is `none`-like at the step level: depth is spent inside the
blocks, not by stopping the loop.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from act_jax.model.halting.base import masked_mean, register
from act_jax.model.halting.none import NoHalting
from act_jax.spec import HaltingSpec


def mod_capacity_k(n_running_B: jax.Array, capacity: float) -> jax.Array:
  """Tokens routed per row: ceil(capacity·n) with a 1e-4 tolerance, in [min(1,n), n]; int32 [B]."""
  n_B = n_running_B.astype(jnp.float32)
  k_B = jnp.ceil(capacity * n_B - 1e-4)
  k_B = jnp.clip(k_B, jnp.minimum(n_B, 1.0), n_B)
  return k_B.astype(jnp.int32)


def mod_route(router_logit_BL: jax.Array, capacity: float,
              running_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row top-k routing among running tokens -> (selected_BL bool, gate_BL f32).

  gate_BL = σ(r) on selected tokens, 0 elsewhere: the model adds gate[..., None] * f(h) to h.
  """
  r_BL = router_logit_BL.astype(jnp.float32)
  running_BL = jnp.asarray(running_BL, bool)
  k_B = mod_capacity_k(running_BL.sum(-1), capacity)
  # rank of each token in its row by descending score, non-running tokens last
  score_BL = jnp.where(running_BL, jax.lax.stop_gradient(r_BL), -jnp.inf)
  order_BL = jnp.argsort(-score_BL, axis=-1, stable=True)
  rank_BL = jnp.argsort(order_BL, axis=-1, stable=True)
  selected_BL = running_BL & (rank_BL < k_B[:, None])
  gate_BL = jnp.where(selected_BL, jax.nn.sigmoid(r_BL), 0.0)
  return selected_BL, gate_BL


def mod_predictor_loss(pred_logit_BL: jax.Array, selected_BL: jax.Array,
                       weights_BL: jax.Array) -> jax.Array:
  """BCE of the decode-time predictor against 'was in the top-k' (labels carry no gradient)."""
  labels_BL = jax.lax.stop_gradient(jnp.asarray(selected_BL).astype(jnp.float32))
  bce_BL = optax.sigmoid_binary_cross_entropy(pred_logit_BL.astype(jnp.float32), labels_BL)
  return masked_mean(bce_BL, weights_BL)


def mod_decode_select(pred_logit_BL: jax.Array, running_BL: jax.Array) -> jax.Array:
  """Causal routing at decode time: route a running token when σ(pred) ≥ 0.5, i.e. pred ≥ 0."""
  return jnp.asarray(running_BL, bool) & (pred_logit_BL >= 0.0)


@register
class MoDPolicy(NoHalting):
  """Mixture-of-Depths: the loop runs every step; routing happens inside the model's blocks.

  loss_terms adds {'mod_predictor': classifier_loss_weight · BCE} when the model put
  'mod_pred_logit' and 'mod_selected' (any leading block axis, [..., B, L]) into aux.
  """

  name = 'mod'
  gates_blocks = True

  def __init__(self, cfg: HaltingSpec, num_steps: int):
    super().__init__(cfg, num_steps)
    self.capacity = float(cfg.mod_capacity)
    self.predictor_weight = float(cfg.classifier_loss_weight)

  def loss_terms(self, aux: Mapping[str, jax.Array], targets_BL: jax.Array,
                 weights_BL: jax.Array) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    if 'mod_pred_logit' not in aux or 'mod_selected' not in aux:
      return None, {}
    pred = aux['mod_pred_logit']
    sel = aux['mod_selected']
    w = jnp.broadcast_to(weights_BL, pred.shape)  # same token weights for every block
    return None, {'mod_predictor': self.predictor_weight * mod_predictor_loss(pred, sel, w)}
