"""Halting policies as pure functions: the model owns the parameters, a policy turns the
per-step signals into who keeps running, the output state, telemetry and loss terms.

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps.

    spec = config.resolve(config)      # builds the policy once: spec.policy
    make_policy(spec.halting, spec.model.num_steps)   # what resolve calls (validates first)
see halting.base for the step contract, the capability flags and `drive`, a reference of
the model's loop.

Adding a policy: its own file (a HaltingPolicy subclass with a `name`, its capability flags
and the @register decorator) plus its one import line below; nothing else tests names.
"""
from __future__ import annotations

import numpy as np

from act_jax.errors import ConfigError
from act_jax.model.halting.act import ACT
from act_jax.model.halting.base import (POLICIES, EarlyExitPolicy, ExitHeads, HaltingPolicy,
                                        drive, exit_loss_weights, register, step_logits,
                                        weighted_exit_ce)
from act_jax.model.halting.confidence import CRITERIA, ConfidenceExit
from act_jax.model.halting.learned_exit import LearnedExit, exit_labels
from act_jax.model.halting.mod import (MoDPolicy, mod_capacity_k, mod_decode_select,
                                 mod_predictor_loss, mod_route)
from act_jax.model.halting.none import NoHalting
from act_jax.model.halting.pondernet import PonderNet, geometric_log_prior, kl_to_prior
from act_jax.spec import HaltingSpec

EXIT_WEIGHTS = ('linear', 'uniform')


def _number(cfg: HaltingSpec, field: str) -> float:
  """The field as a float; bools, strings and None are rejected naming the field."""
  value = getattr(cfg, field)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise ConfigError(f'halting.{field}={value!r} must be a number')
  return float(value)


def validate_halting(cfg: HaltingSpec, num_steps: int) -> None:
  """Raise ConfigError naming the bad field; every field is checked whatever the policy."""
  name = cfg.name
  if name not in POLICIES:
    raise ConfigError(f'halting.name={name!r} is unknown; known: {", ".join(sorted(POLICIES))}')
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ConfigError(f'num_steps (max depth steps)={num_steps!r} must be an int >= 1')

  thr = _number(cfg, 'threshold')
  if not 0.0 < thr <= 1.0:
    raise ConfigError(f'halting.threshold={thr} must be in (0, 1]')
  eps = _number(cfg, 'eps')
  if not 0.0 < eps < 1.0:
    raise ConfigError(f'halting.eps={eps} must be in (0, 1)')
  bias = _number(cfg, 'bias_init')
  if bias != bias or bias in (float('inf'), float('-inf')):
    raise ConfigError(f'halting.bias_init={bias} must be finite (≈ −2: b ≥ 0 halts at step ~2)')
  for field in ('ponder_cost', 'beta', 'classifier_loss_weight', 'distill'):
    value = _number(cfg, field)
    if not value >= 0.0 or value == float('inf'):
      raise ConfigError(f'halting.{field}={value} must be finite and >= 0')
  lam = _number(cfg, 'lambda_p')
  if not 0.0 < lam < 1.0:
    raise ConfigError(f'halting.lambda_p={lam} must be in (0, 1)')
  cap = _number(cfg, 'mod_capacity')
  if not 0.0 < cap <= 1.0:
    raise ConfigError(f'halting.mod_capacity={cap} must be in (0, 1]')

  every = cfg.exit_every
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
    raise ConfigError(f'halting.exit_every={every!r} must be an int >= 1')
  if every > num_steps:
    raise ConfigError(f'halting.exit_every={every} puts exit layers beyond depth '
                      f'(num_steps={num_steps})')
  crit = cfg.criterion
  if crit not in CRITERIA:
    raise ConfigError(f'halting.criterion={crit!r} is unknown; known: {", ".join(CRITERIA)}')
  ew = cfg.exit_weights
  if ew not in EXIT_WEIGHTS:
    raise ConfigError(f'halting.exit_weights={ew!r} is unknown; known: {", ".join(EXIT_WEIGHTS)}')
  aware = _number(cfg, 'exit_aware')
  if not 0.0 <= aware < 1.0:
    raise ConfigError(f'halting.exit_aware={aware} must be in [0, 1) (0: off; else the lowest '
                      f'per-row training threshold)')
  if aware > 0 and not POLICIES[name].supports_exit_aware:
    able = [n for n, c in sorted(POLICIES.items()) if c.supports_exit_aware]
    raise ConfigError(f'halting.exit_aware={aware} needs a policy that supports exit-aware '
                      f'training ({", ".join(able)}); halting.name={name!r}')
  warm = cfg.cost_warmup
  if isinstance(warm, bool) or not isinstance(warm, (int, np.integer)) or warm < 0:
    raise ConfigError(f'halting.cost_warmup={warm!r} must be an int >= 0 (training steps over '
                      f'which the compute cost ramps in; 0: full cost from the start)')
  for field in ('per_sequence', 'sample'):
    if not isinstance(getattr(cfg, field), (bool, np.bool_)):
      raise ConfigError(f'halting.{field}={getattr(cfg, field)!r} must be a bool')


def make_policy(cfg: HaltingSpec, num_steps: int) -> HaltingPolicy:
  """Validate the halting spec and build the named policy for a loop of num_steps steps."""
  validate_halting(cfg, num_steps)
  return POLICIES[cfg.name](cfg, num_steps)


__all__ = [
    'ACT', 'CRITERIA', 'ConfidenceExit', 'EXIT_WEIGHTS', 'EarlyExitPolicy', 'ExitHeads',
    'HaltingPolicy',
    'LearnedExit', 'MoDPolicy', 'NoHalting', 'POLICIES', 'PonderNet', 'drive', 'exit_labels',
    'exit_loss_weights', 'geometric_log_prior', 'kl_to_prior', 'make_policy', 'mod_capacity_k',
    'mod_decode_select', 'mod_predictor_loss', 'mod_route', 'register', 'step_logits',
    'validate_halting', 'weighted_exit_ce',
]
