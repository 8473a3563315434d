"""Confident Adaptive Language Modeling, CALM (Schuster et al. 2022): early exit from the
depth loop when an intermediate prediction is confident enough.

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps.

Exit heads: the model applies the SHARED LM head (after the final norm) to the state after step
l, for l in the exit set E = {l : (l+1) % exit_every == 0} ∪ {N−1} (0-based; the last step is
always an exit). Training runs every step and uses
    L = Σ_{l∈E} ω_l L_l / Σ_{l∈E} ω_l,     ω_l ∝ l+1 ('linear', default) or 1 ('uniform'),
with L_l the token-mean cross-entropy of exit l's logits (1-based l+1 so step 0 keeps weight).
Confidence c_t^l (criterion):
    'softmax'    : max_v softmax(z_t^l)_v                       top-1 probability
    'margin'     : top-1 − top-2 softmax probability
    'saturation' : cos(h_t^l, h_t^{l−1})                       the state stopped moving
Inference: exit at the first l ∈ E with c_t^l ≥ threshold (default cfg.threshold), else at N−1.
The confidence is a decision only (stop_gradient). per_sequence=True: a row exits when the MIN
confidence over its running tokens passes the threshold (every token must be sure).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from act_jax.errors import ConfigError
from act_jax.model.halting.base import EarlyExitPolicy, StepOut, register
from act_jax.spec import HaltingSpec

CRITERIA = ('softmax', 'margin', 'saturation')


def softmax_confidence(logits_BLV: jax.Array) -> jax.Array:
  """Top-1 softmax probability, f32 [B,L]."""
  return jax.nn.softmax(logits_BLV.astype(jnp.float32), axis=-1).max(-1)


def margin_confidence(logits_BLV: jax.Array) -> jax.Array:
  """Top-1 minus top-2 softmax probability, f32 [B,L]."""
  probs_BLV = jax.nn.softmax(logits_BLV.astype(jnp.float32), axis=-1)
  top2_BL2 = jax.lax.top_k(probs_BLV, 2)[0]
  return top2_BL2[..., 0] - top2_BL2[..., 1]


def saturation_confidence(h_prev_BLD: jax.Array, h_new_BLD: jax.Array) -> jax.Array:
  """cos(h^l, h^{l−1}) per token, f32 [B,L]."""
  a = h_new_BLD.astype(jnp.float32)
  b = h_prev_BLD.astype(jnp.float32)
  num = (a * b).sum(-1)
  den = jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))
  return num / jnp.maximum(den, 1e-12)


@register
class ConfidenceExit(EarlyExitPolicy):
  """CALM early exit by softmax / margin / saturation confidence."""

  name = 'confidence'
  score_key = 'confidence'

  def __init__(self, cfg: HaltingSpec, num_steps: int):
    super().__init__(cfg, num_steps)
    self.criterion = str(cfg.criterion)
    if self.criterion not in CRITERIA:
      raise ConfigError(f'halting.criterion={self.criterion!r}; known: {", ".join(CRITERIA)}')

  @property
  def step_reads_exit_logits(self) -> bool:  # saturation reads the states only
    return self.criterion != 'saturation'

  def exit_score(self, logits_BLV: jax.Array) -> jax.Array:
    if self.criterion == 'margin':
      return margin_confidence(logits_BLV)
    return softmax_confidence(logits_BLV)

  def score(self, h_prev_BLD: jax.Array, h_new_BLD: jax.Array,
            signals: Mapping[str, jax.Array]) -> tuple[jax.Array, StepOut]:
    if self.criterion == 'saturation':
      return saturation_confidence(h_prev_BLD, h_new_BLD), {}
    if 'exit_score' in signals:  # the training forward: computed by length tiles
      return signals['exit_score'], {}
    return self.exit_score(signals['exit_logits']), {}
