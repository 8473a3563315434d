"""Learned early exit: a per-step exit classifier decides when a token's prediction is final
(the "meta" classifier of CALM, Schuster et al. 2022, §4; cf. BERxiT / PABEE-style exits).

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps.

The model computes c_t^l = classifier(stop_gradient(h_t^l)) (so the classifier never shapes the
states) and supplies it as signals['exit_classifier_logit'] [B,L]. With ŷ_l the exit-head
prediction after step l (shared LM head) and E the exit set (every exit_every-th step and N−1):
    label_t^l = 1[argmax ŷ_t^l == argmax ŷ_t^{N−1}]            (stop_gradient)
    L_bce     = mean_{l ∈ E∖{N−1}, t} BCE(c_t^l, label_t^l)    × classifier_loss_weight
    L_task    = Σ_{l∈E} ω_l L_l / Σ ω_l                          (same weighted per-exit CE as CALM)
The last step is left out of the BCE: its label is always 1 and its decision is never used
(the last step always exits); with no other exit the BCE is 0.
Inference: exit at the first l ∈ E with σ(c_t^l) ≥ threshold (default cfg.threshold).
per_sequence=True: a row exits when the MIN exit probability over its running tokens passes.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from act_jax.model.halting.base import (EarlyExitPolicy, ExitHeads, StepOut, masked_mean,
                                        register)
from act_jax.spec import HaltingSpec


def exit_labels(step_logits_NBLV: jax.Array) -> jax.Array:
  """bool [N,B,L]: step n's argmax equals the last step's argmax (no gradient)."""
  pred_NBL = jnp.argmax(jax.lax.stop_gradient(step_logits_NBLV), axis=-1)
  return pred_NBL == pred_NBL[-1:]


def _labels(heads: ExitHeads, steps: np.ndarray, num_steps: int) -> jax.Array:
  """bool [X,B,L]: exit_labels at `steps`, from either form of the exits' heads."""
  pred_XBL = heads.argmax(tuple(int(s) for s in steps) + (num_steps - 1,))
  return pred_XBL[:-1] == pred_XBL[-1:]


@register
class LearnedExit(EarlyExitPolicy):
  """Early exit when the learned classifier's σ(c) ≥ threshold."""

  name = 'learned_exit'
  score_key = 'exit_prob'
  needs_exit_classifier = True

  def __init__(self, cfg: HaltingSpec, num_steps: int):
    super().__init__(cfg, num_steps)
    self.classifier_loss_weight = float(cfg.classifier_loss_weight)

  def score(self, h_prev_BLD: jax.Array, h_new_BLD: jax.Array,
            signals: Mapping[str, jax.Array]) -> tuple[jax.Array, StepOut]:
    logit_BL = signals['exit_classifier_logit'].astype(jnp.float32)
    return jax.nn.sigmoid(logit_BL), {'exit_classifier_logit': logit_BL}

  def loss_terms(self, aux: Mapping[str, jax.Array], targets_BL: jax.Array,
                 weights_BL: jax.Array) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    task, extra = super().loss_terms(aux, targets_BL, weights_BL)
    steps = np.asarray([s for s in self.exit_steps() if s != self.num_steps - 1], np.int32)
    if steps.size == 0:
      return task, {**extra, 'exit_bce': jnp.zeros((), jnp.float32)}
    labels_XBL = _labels(ExitHeads.of(aux), steps, self.num_steps).astype(jnp.float32)
    logits_XBL = aux['exit_classifier_logit'][steps].astype(jnp.float32)
    bce_XBL = optax.sigmoid_binary_cross_entropy(logits_XBL, labels_XBL)
    w_XBL = jnp.broadcast_to(weights_BL, bce_XBL.shape)
    return task, {**extra,
                  'exit_bce': self.classifier_loss_weight * masked_mean(bce_XBL, w_XBL)}
