"""Generalist fallback: a token the routed experts do not cover goes to the generalist path.

When an input wanders where no specialist is confident, routing it to its top-k anyway mixes
poorly matched experts. With moe.fallback set, a running token falls back when
  * its router confidence is low:  c < moe.fallback_threshold, with
        'max_prob': c = max_e p_e                      (p = softmax of the router logits)
        'entropy' : c = 1 - H(p) / log E              (1: one expert certain, 0: uniform)
  * or it overflowed every expert it chose (capacity dropped all K choices).
A fallback token takes no routed slot (it is removed from routing before capacity is
assigned, so it frees capacity for the others) and its FFN output is the generalist's alone,
at full weight: the shared expert(s) (moe.shared_experts >= 1, DeepSeekMoE's always-on path).
Training with fallback on is differentiable where it is trained: the shared expert gets the
fallback tokens' gradient; the routed experts and router get none from them.

The threshold is calibrated on held-out in-domain data (calibrate_threshold: the `rate`
quantile of c over running tokens of every MoE layer), so in-domain only about `rate` of the
tokens fall back and out-of-domain text, where routers are less sure, falls back more.
Telemetry: aux['moe']['fallback'] [B, L] per token and 'fallback_frac' per layer, and the
per-token confidence 'fallback_score' [B, L] the calibration reads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.errors import ConfigError

CRITERIA = ('none', 'max_prob', 'entropy')


def validate(moe_cfg, router_info) -> None:
  """ConfigError naming moe.fallback / moe.fallback_threshold / moe.shared_experts."""
  crit, thr = moe_cfg.fallback, moe_cfg.fallback_threshold
  if crit not in CRITERIA:
    raise ConfigError(f'moe.fallback={crit!r}: allowed: {", ".join(CRITERIA)}')
  if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
    raise ConfigError(f'moe.fallback_threshold={thr!r}: must be in [0, 1] (0: never)')
  if crit == 'none':
    return
  if not router_info.can_fall_back:
    raise ConfigError(f'moe.fallback={crit!r} needs a token-choice router with learned '
                      f'probabilities (top_k, dropless); moe.router={moe_cfg.router!r}')
  if moe_cfg.shared_experts < 1:
    raise ConfigError(f'moe.fallback={crit!r} needs a generalist path: moe.shared_experts >= 1 '
                      f'(got {moe_cfg.shared_experts})')


def score(probs_GSE: jax.Array, criterion: str) -> jax.Array:
  """Router confidence c per token, f32 [G, S] (see the module docstring)."""
  p = probs_GSE.astype(jnp.float32)
  if criterion == 'entropy':
    h = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), -1)
    return 1.0 - h / np.log(max(p.shape[-1], 2))
  return jnp.max(p, -1)


def calibrate_threshold(scores: np.ndarray, rate: float) -> float:
  """The threshold at which a `rate` share of these (in-domain, running) scores fall back."""
  if not 0 < rate < 1:
    raise ConfigError(f'--fallback_rate={rate}: must be in (0, 1)')
  s = np.asarray(scores, np.float64).ravel()
  if s.size == 0:
    raise ConfigError('no running tokens to calibrate the fallback threshold on')
  return float(np.quantile(s, rate))
