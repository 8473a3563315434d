"""PonderNet (Banino et al. 2021, "PonderNet: Learning to Ponder"): a probabilistic halting
distribution over depth, trained by its expected loss plus a KL to a geometric prior.

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps.

With λ_n = σ(halt_logit_n) the conditional probability of halting at step n (1-based):
    p_n     = λ_n Π_{j<n} (1 − λ_j)            for n < N_max
    p_N_max = Π_{j<N_max} (1 − λ_j)            (λ_N_max := 1, so Σ_n p_n = 1 exactly)
    loss    = Σ_n p_n L_n  +  β · KL(p ‖ p_G)
    p_G(n)  = (1 − λ_p)^{n−1} λ_p, truncated to n ≤ N_max and renormalised
    KL(p ‖ p_G) = Σ_n p_n (log p_n − log p_G(n))
The KL direction is p first (Banino eq. 6); much public code computes KL(p_G ‖ p) instead,
which punishes different distributions — tests pin the direction. log p_n is built in log
space (log σ(x), log σ(−x)) so a vanishing p_n never produces log 0.

Inference (train=False): halt at the first n with Σ_{m≤n} p_m ≥ threshold (default
cfg.threshold), or with cfg.sample=True halt with probability λ_n at each step, using the
model-supplied signals['uniform'] ~ U[0,1) ([B,L]): halt when uniform < λ_n.
Training (train=True) runs every step: the expected loss needs every step's loss L_n, which
base.ExitHeads computes from the steps' states one token tile at a time (needs_exit_logits=True;
no [N,B,L,V] in training). In eval, p is only filled
up to each token's exit step (0 after), so p no longer sums to 1 there.
per_sequence=True: λ_n is the mean of λ over the row's running tokens, so a row halts as one.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.model.halting.base import (ExitHeads, HaltingPolicy, State, StepOut, masked_mean,
                                        pool_mean_over_row, record_exit, register)
from act_jax.spec import HaltingSpec

_TINY = 1e-30


def geometric_log_prior(lambda_p: float, num_steps: int) -> np.ndarray:
  """log p_G(n), n = 1..N: geometric(λ_p) truncated to N steps and renormalised; f32 [N]."""
  n = np.arange(num_steps, dtype=np.float64)  # n − 1 for 1-based n
  log_unnorm = n * np.log1p(-lambda_p) + np.log(lambda_p)
  log_z = np.log(-np.expm1(num_steps * np.log1p(-lambda_p)))  # Σ = 1 − (1 − λ_p)^N
  return (log_unnorm - log_z).astype(np.float32)


def kl_to_prior(p_NBL: jax.Array, log_p_NBL: jax.Array, log_prior_N: jax.Array) -> jax.Array:
  """KL(p ‖ p_G) = Σ_n p_n (log p_n − log p_G(n)) per token, [B,L]; terms with p_n = 0 are 0."""
  log_prior_NBL = jnp.asarray(log_prior_N, jnp.float32).reshape((-1,) + (1,) * (p_NBL.ndim - 1))
  terms_NBL = jnp.where(p_NBL > 0, p_NBL * (log_p_NBL - log_prior_NBL), 0.0)
  return terms_NBL.sum(0)


@register
class PonderNet(HaltingPolicy):
  """PonderNet halting distribution; loss = Σ p_n L_n + β KL(p ‖ p_G)."""

  name = 'pondernet'
  needs_halt_unit = True
  needs_exit_logits = True  # the expected loss Σ p_n L_n needs every step's logits
  can_exit = True
  cost_terms = ('kl',)

  def __init__(self, cfg: HaltingSpec, num_steps: int):
    super().__init__(cfg, num_steps)
    self.beta = float(cfg.beta)
    self.lambda_p = float(cfg.lambda_p)
    self.sample = bool(cfg.sample)
    self.log_prior_N = geometric_log_prior(self.lambda_p, self.num_steps)

  @property
  def needs_uniform(self) -> bool:
    return self.sample

  def init(self, h_BLD: jax.Array) -> State:
    B, L = h_BLD.shape[:2]
    z_BL = jnp.zeros((B, L), jnp.float32)
    return {
        'log_not_halted': z_BL,  # Σ_{j<n} log(1 − λ_j)
        'cum_p': z_BL,
        'exit_step': jnp.zeros((B, L), jnp.int32),
    }

  def step(self, state: State, h_prev_BLD: jax.Array, h_new_BLD: jax.Array,
           signals: Mapping[str, jax.Array], i: jax.Array, threshold: jax.Array,
           running_BL: jax.Array, train: bool) -> tuple[State, jax.Array, StepOut]:
    logit_BL = signals['halt_logit'].astype(jnp.float32)
    if self.per_sequence:
      lam_BL = pool_mean_over_row(jax.nn.sigmoid(logit_BL), running_BL)
      log_lam_BL = jnp.log(jnp.maximum(lam_BL, _TINY))
      log_1m_lam_BL = jnp.log(jnp.maximum(1.0 - lam_BL, _TINY))
    else:
      lam_BL = jax.nn.sigmoid(logit_BL)
      log_lam_BL = jax.nn.log_sigmoid(logit_BL)
      log_1m_lam_BL = jax.nn.log_sigmoid(-logit_BL)
    last = self.is_last(i)
    lam_BL = jnp.where(last, 1.0, lam_BL)  # λ_N := 1: the last step takes the remaining mass
    log_lam_BL = jnp.where(last, 0.0, log_lam_BL)
    log_p_BL = log_lam_BL + state['log_not_halted']
    p_BL = jnp.exp(log_p_BL)
    cum_BL = state['cum_p'] + p_BL

    if train:
      halt_BL = running_BL & last  # every step's loss is needed
    else:
      if self.sample:
        crit_BL = signals['uniform'].astype(jnp.float32) < lam_BL
      else:
        crit_BL = cum_BL >= jnp.asarray(threshold, jnp.float32)
      halt_BL = running_BL & (crit_BL | last)
    running_next_BL = running_BL & ~halt_BL

    new_state = {
        'log_not_halted': jnp.where(running_BL, state['log_not_halted'] + log_1m_lam_BL,
                                    state['log_not_halted']),
        'cum_p': jnp.where(running_BL, cum_BL, state['cum_p']),
        'exit_step': record_exit(state['exit_step'], running_BL, running_next_BL, i),
    }
    out = {
        'p': jnp.where(running_BL, p_BL, 0.0),
        'log_p': jnp.where(running_BL, log_p_BL, 0.0),
        'lambda': jnp.where(running_BL, lam_BL, 0.0),
    }
    return new_state, running_next_BL, out

  def finalize(self, state: State, h_last_BLD: jax.Array,
               step_outs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    p_NBL = step_outs['p']
    n_N11 = jnp.arange(1, self.num_steps + 1, dtype=jnp.float32)[:, None, None]
    aux = {
        'exit_step': state['exit_step'],
        'p': p_NBL,
        'log_p': step_outs['log_p'],
        'lambda': step_outs['lambda'],
        'expected_steps': (n_N11 * p_NBL).sum(0),  # E[N] under p (1-based)
    }
    return h_last_BLD, aux

  def loss_terms(self, aux: Mapping[str, jax.Array], targets_BL: jax.Array,
                 weights_BL: jax.Array) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    p_NBL = aux['p']
    ce_NBL = ExitHeads.of(aux).ce(targets_BL, tuple(range(self.num_steps)))
    task = masked_mean((p_NBL * ce_NBL).sum(0), weights_BL)
    kl_BL = kl_to_prior(p_NBL, aux['log_p'], self.log_prior_N)
    return task, {'kl': self.beta * masked_mean(kl_BL, weights_BL)}
