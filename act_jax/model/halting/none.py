"""`none`: a fixed-depth loop, every token runs all N steps (the baseline without halting).

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps.

running^n = 1 for n < N-1 and 0 after the last step; the output is the last state h^{N-1}.
(Tokens the model starts as not running, e.g. padding, stay frozen at their input.)
"""
from __future__ import annotations

from typing import Mapping

import jax

from act_jax.model.halting.base import HaltingPolicy, State, StepOut, record_exit, register


@register
class NoHalting(HaltingPolicy):
  """Runs every step; only stops at the last one."""

  name = 'none'

  def step(self, state: State, h_prev_BLD: jax.Array, h_new_BLD: jax.Array,
           signals: Mapping[str, jax.Array], i: jax.Array, threshold: jax.Array,
           running_BL: jax.Array, train: bool) -> tuple[State, jax.Array, StepOut]:
    running_next_BL = running_BL & ~self.is_last(i)
    exit_BL = record_exit(state['exit_step'], running_BL, running_next_BL, i)
    return {'exit_step': exit_BL}, running_next_BL, {}
