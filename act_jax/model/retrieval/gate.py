"""The retrieval gate: whether a token consults the datastore at this exit step.

Adaptive retrieval for kNN-LMs (He, Neubig & Berg-Kirkpatrick 2021) trains a small network
on cheap features to predict when retrieval helps; TARG (2025) gates on the logit margin.
Here the gate is a logistic regression over features of the exit head's distribution at
the step and of the state itself (He et al. feed the context vector too), all of which the
exit decision computes anyway; it costs one dot product of size D + 4 per token:
    f = [max_v p_v, H(p) / log V, p_(1) - p_(2), n / (N - 1), q / sqrt(D)]
    (q = final_norm(h): the query the search would use, a vector of D entries)
    P(retrieve helps | f) = sigmoid(w . f + b)
trained on text the datastore does not hold -- documents of its corpus kept out of it, and
windows of the run's own training corpus (text the datastore does not cover) -- with the
label
    y = 1[argmax (lam p_kNN + (1 - lam) p_LM) = target  and  argmax p_LM != target]
(retrieval turns a wrong prediction right: where it is worth a search; raising the
probability of an already-right token is not), by Newton's method (IRLS) on the L2-
regularised log-loss. The retrieval distance is not a gate feature: it needs the search the
gate exists to skip; it decides after the search instead (arm.py: p_kNN is used only when the
nearest key is within the tuned max_distance). Like the exit classifier the gate never
trains the backbone.

The interpolation weight lam and the kNN temperature tau are chosen on the datastore-domain
tokens (kNN-LM tunes lam on validation): the pair of a small grid with the best mean
log-likelihood at full depth (datastore.tune). The gate threshold is the largest one whose
accuracy gain keeps `keep` (default 90 %) of always-retrieve's gain on held-back tokens.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FEATURES = ('max_prob', 'entropy', 'margin', 'depth', 'query/sqrt(D)')
SCALARS = 4  # the distribution's features; then the D entries of the query
NEVER = 2.0  # a gate threshold above any probability: the gate never fires


def features(logits_BLV: jax.Array, q_BLD: jax.Array, step, num_steps: int) -> jax.Array:
  """f32 [B, L, 4 + D]: the FEATURES of each token's exit-head distribution at `step` and of
  its query q (any leading dims)."""
  logits = logits_BLV.astype(jnp.float32)
  p = jax.nn.softmax(logits, -1)
  top2 = jax.lax.top_k(p, 2)[0]
  ent = -jnp.sum(p * jax.nn.log_softmax(logits, -1), -1) / np.log(logits.shape[-1])
  depth = jnp.broadcast_to(jnp.asarray(step, jnp.float32) / max(num_steps - 1, 1),
                           top2.shape[:-1])
  scalars = jnp.stack([top2[..., 0], ent, top2[..., 0] - top2[..., 1], depth], -1)
  q = q_BLD.astype(jnp.float32) / np.sqrt(q_BLD.shape[-1])
  return jnp.concatenate([scalars, q], -1)


def prob(gate: dict, f: jax.Array) -> jax.Array:
  """sigmoid(w . f + b) over the last axis of f."""
  return jax.nn.sigmoid(f @ gate['w'].astype(jnp.float32) + gate['b'].astype(jnp.float32))


def fit(f: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 25) -> dict:
  """Logistic regression by IRLS: {'w': [F], 'b': []} (float32) maximising
  sum y log s + (1-y) log(1-s) - l2/2 |w|^2 over rows of f [Z, F], labels y [Z] in {0,1}."""
  x = np.concatenate([np.asarray(f, np.float64), np.ones((len(f), 1))], 1)
  y = np.asarray(y, np.float64)
  theta = np.zeros(x.shape[1])
  reg = np.full(x.shape[1], l2)
  reg[-1] = 0.0  # the bias is not shrunk
  for _ in range(iters):
    s = 1.0 / (1.0 + np.exp(-x @ theta))
    grad = x.T @ (y - s) - reg * theta
    hess = (x * (s * (1 - s))[:, None]).T @ x + np.diag(reg) + 1e-9 * np.eye(x.shape[1])
    step = np.linalg.solve(hess, grad)
    theta = theta + step
    if np.max(np.abs(step)) < 1e-8:
      break
  return {'w': theta[:-1].astype(np.float32), 'b': np.float32(theta[-1])}


def choose_threshold(p_gate: np.ndarray, correct_lm: np.ndarray, correct_knn: np.ndarray,
                     keep: float = 0.9, grid: Sequence[float] | None = None) -> float:
  """The largest gate threshold t whose gain keeps `keep` of always-retrieve's:
      mean(where(p_gate >= t, correct_knn, correct_lm)) - mean(correct_lm)
          >= keep * (mean(correct_knn) - mean(correct_lm)).
  NEVER when always-retrieving gains nothing (the gate should not fire)."""
  lm, kn = np.asarray(correct_lm, np.float64), np.asarray(correct_knn, np.float64)
  gain_all = kn.mean() - lm.mean()
  if gain_all <= 0:
    return NEVER
  grid = np.linspace(0.0, 1.0, 101) if grid is None else np.asarray(grid)
  best = 0.0
  for t in grid:
    gain = np.where(p_gate >= t, kn, lm).mean() - lm.mean()
    if gain >= keep * gain_all - 1e-12:
      best = max(best, float(t))
  return best
