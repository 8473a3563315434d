"""Adaptive Computation Time (Graves 2016, "Adaptive Computation Time for Recurrent Neural
Networks"), applied over depth as in the Universal Transformer (Dehghani et al. 2019).

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps.

Per token t and step n (1-based in the formulas, 0-based in code):
    p_t^n = σ(halt_logit_t^n)                           halting unit on the new state h_t^n
    N_t   = min{ n : Σ_{m≤n} p_t^m ≥ 1 − ε }            capped: the last allowed step halts
    R_t   = 1 − Σ_{m<N_t} p_t^m                         remainder, in (0, 1]
    w_t^n = p_t^n for n < N_t,  w_t^{N_t} = R_t,  0 after      (Σ_n w_t^n = 1 exactly)
    y_t   = Σ_n w_t^n h_t^n                             the output: halting-weighted mix of states
    ρ_t   = N_t + R_t                                   ponder cost; loss += τ · mean_t ρ_t
N_t is piecewise constant, so only R_t carries gradient (to the halting unit).
Worked example: p = [0.3, 0.5, 0.4], ε = 0.01 -> w = [0.3, 0.5, 0.2], N = 3, R = 0.2.

Notes.
* y is accumulated as the exact weighted SUM Σ w h (Graves). The Universal Transformer's running
  blend  s ← h·w + s·(1−w)  is a different quantity, and tensor2tensor#1004 wrote it with an
  operator-precedence bug (`s * 1 - w`); neither is used here.
* The halting unit's bias must start NEGATIVE (config bias_init ≈ −2, p ≈ 0.12): with b ≥ 0 every
  p ≥ 0.5 and all tokens halt at step ~2 before learning anything.
* The halting threshold is 1 − ε in training (the ε of the ponder-cost definition); in eval the
  caller's traced `threshold` (default 1 − ε) replaces it, so lower thresholds halt earlier.
* per_sequence=True: p is the mean of p_t over the row's running tokens, so a row halts as one.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from act_jax.model.halting.base import (HaltingPolicy, State, StepOut, masked_mean,
                                  pool_mean_over_row, record_exit, register)
from act_jax.spec import HaltingSpec


@register
class ACT(HaltingPolicy):
  """ACT over depth; the output is Σ_n w^n h^n and the loss adds τ·mean(N + R)."""

  name = 'act'
  needs_halt_unit = True
  can_exit = True
  cost_terms = ('ponder',)

  def __init__(self, cfg: HaltingSpec, num_steps: int):
    super().__init__(cfg, num_steps)
    self.eps = float(cfg.eps)
    self.ponder_cost = float(cfg.ponder_cost)

  def default_threshold(self) -> float:
    return 1.0 - self.eps

  def init(self, h_BLD: jax.Array) -> State:
    B, L, D = h_BLD.shape
    z_BL = jnp.zeros((B, L), jnp.float32)
    return {
        'cum_p': z_BL,  # Σ p over the steps that did not halt
        'remainder': z_BL,
        'n_updates': z_BL,  # steps taken (N once halted)
        'acc': jnp.zeros((B, L, D), jnp.float32),  # Σ w h, in f32 even for bf16 states
        'exit_step': jnp.zeros((B, L), jnp.int32),
    }

  def step(self, state: State, h_prev_BLD: jax.Array, h_new_BLD: jax.Array,
           signals: Mapping[str, jax.Array], i: jax.Array, threshold: jax.Array,
           running_BL: jax.Array, train: bool) -> tuple[State, jax.Array, StepOut]:
    p_BL = jax.nn.sigmoid(signals['halt_logit'].astype(jnp.float32))
    if self.per_sequence:
      p_BL = pool_mean_over_row(p_BL, running_BL)
    thr = jnp.float32(1.0 - self.eps) if train else jnp.asarray(threshold, jnp.float32)
    cum_BL = state['cum_p']
    halt_BL = running_BL & ((cum_BL + p_BL >= thr) | self.is_last(i))
    cont_BL = running_BL & ~halt_BL
    rem_now_BL = 1.0 - cum_BL  # the halting step gets what is left of the unit budget
    w_BL = jnp.where(halt_BL, rem_now_BL, jnp.where(running_BL, p_BL, 0.0))
    new_state = {
        'cum_p': jnp.where(cont_BL, cum_BL + p_BL, cum_BL),
        'remainder': jnp.where(halt_BL, rem_now_BL, state['remainder']),
        'n_updates': state['n_updates'] + running_BL.astype(jnp.float32),
        'acc': state['acc'] + w_BL[..., None] * h_new_BLD.astype(jnp.float32),
        'exit_step': record_exit(state['exit_step'], running_BL, cont_BL, i),
    }
    out = {'halt_prob': jnp.where(running_BL, p_BL, 0.0), 'weight': w_BL}
    return new_state, cont_BL, out

  def finalize(self, state: State, h_last_BLD: jax.Array,
               step_outs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    ran_BL = state['n_updates'] > 0  # tokens that never ran (padding) keep their input state
    h_out_BLD = jnp.where(ran_BL[..., None], state['acc'], h_last_BLD.astype(jnp.float32))
    # ρ = N + R: N is a step count (no gradient), R carries the halting unit's gradient
    ponder_BL = jax.lax.stop_gradient(state['n_updates']) + state['remainder']
    aux = {
        'exit_step': state['exit_step'],
        'halt_prob': step_outs['halt_prob'],
        'weights': step_outs['weight'],
        'ponder': ponder_BL,
        'remainder': state['remainder'],
    }
    return h_out_BLD.astype(h_last_BLD.dtype), aux

  def loss_terms(self, aux: Mapping[str, jax.Array], targets_BL: jax.Array,
                 weights_BL: jax.Array) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    return None, {'ponder': self.ponder_cost * masked_mean(aux['ponder'], weights_BL)}
