"""Halting policies against the checked math (known answers, invariants, traps).

Dims: B batch, L length, D d_model, V vocab, N depth steps.
"""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax.errors import ConfigError
from act_jax.model.halting import (POLICIES, exit_labels, geometric_log_prior, make_policy,
                             mod_capacity_k, mod_decode_select, mod_predictor_loss, mod_route,
                             validate_halting)
from act_jax.model.halting.base import drive, exit_distill_kl


# ---------------------------------------------------------------- helpers

def make_cfg(**overrides):
  """The default config.halting with overrides, as the HaltingSpec policies take."""
  return config_lib.halting_spec(**overrides)


def policy_of(name: str, num_steps: int, **overrides):
  return make_policy(make_cfg(name=name, **overrides), num_steps)


def logit(p) -> np.ndarray:
  p = np.asarray(p, np.float64)
  return np.log(p) - np.log1p(-p)


def run_policy(policy, h0, block_fn, signal_fn, threshold=None, train=False, running=None):
  """The model loop (lax.scan, freeze with where) — halting.base.drive, jitted."""
  fn = jax.jit(lambda h, t: drive(policy, h, block_fn, signal_fn, t, train, running))
  thr = policy.default_threshold() if threshold is None else threshold
  return fn(h0, jnp.float32(thr))


def loop_policy(policy, h0_BLD, states_NBLD, signals, threshold=None, train=False,
                running_BL=None):
  """Eager python loop mimicking the model: step i's block output is states_NBLD[i]."""
  thr = jnp.float32(policy.default_threshold() if threshold is None else threshold)
  h = jnp.asarray(h0_BLD)
  B, L = h.shape[:2]
  running = jnp.ones((B, L), bool) if running_BL is None else jnp.asarray(running_BL)
  state = policy.init(h)
  outs = []
  for i in range(policy.num_steps):
    h_new = jnp.where(running[..., None], jnp.asarray(states_NBLD[i]), h)
    state, run_next, out = policy.step(state, h, h_new, signals[i], jnp.int32(i), thr,
                                       running, train)
    outs.append(out)
    running = running & run_next
    h = h_new
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *outs) if outs[0] else {}
  return policy.finalize(state, h, stacked)


def table_signal(key: str, table_N):
  """signal_fn returning a fixed per-step table entry (indexed by the traced step)."""
  table_N = jnp.asarray(table_N)
  return lambda h, i: {key: table_N[i]}


def tanh_block(seed: int, D: int):
  W = jnp.asarray(np.random.default_rng(seed).normal(size=(D, D)) / math.sqrt(D), jnp.float32)
  return lambda h, i: jnp.tanh(h.astype(jnp.float32) @ W + 0.3).astype(h.dtype)


def reference_trajectory(block_fn, h0, N):
  """States h^1..h^N without freezing: tokens are independent under tanh_block."""
  hs, h = [], h0
  for i in range(N):
    h = block_fn(h, jnp.int32(i))
    hs.append(h)
  return jnp.stack(hs)


def peaked_logits(top_prob: float, V: int, cls: int = 0) -> np.ndarray:
  """Logits whose softmax puts top_prob on `cls` and spreads the rest evenly."""
  p = np.full((V,), (1 - top_prob) / (V - 1))
  p[cls] = top_prob
  return np.log(p)


# ---------------------------------------------------------------- ACT

ACT_P = np.array([  # [N=3, B=2, L=2]: per token the sequence of p over steps
    [[0.3, 0.995], [0.1, 0.6]],
    [[0.5, 0.5], [0.1, 0.45]],
    [[0.4, 0.5], [0.1, 0.9]],
])
ACT_W = np.array([  # hand-computed halting weights
    [[0.3, 1.0], [0.1, 0.6]],
    [[0.5, 0.0], [0.1, 0.4]],
    [[0.2, 0.0], [0.8, 0.0]],
])


def _act_known(threshold=None, train=False):
  rng = np.random.default_rng(0)
  states = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  h0 = rng.normal(size=(2, 2, 4)).astype(np.float32)
  signals = [{'halt_logit': jnp.asarray(logit(ACT_P[i]), jnp.float32)} for i in range(3)]
  policy = policy_of('act', 3, eps=0.01)
  h_out, aux = loop_policy(policy, h0, states, signals, threshold, train)
  return states, h_out, aux


def test_act_known_answer():
  states, h_out, aux = _act_known()
  np.testing.assert_allclose(aux['weights'], ACT_W, atol=1e-6)
  # token (0,0): the worked example p=[0.3,0.5,0.4] -> w=[0.3,0.5,0.2], N=3, R=0.2
  np.testing.assert_allclose(aux['weights'][:, 0, 0], [0.3, 0.5, 0.2], atol=1e-6)
  np.testing.assert_array_equal(aux['exit_step'], [[2, 0], [2, 1]])  # N−1
  np.testing.assert_allclose(aux['remainder'], [[0.2, 1.0], [0.8, 0.4]], atol=1e-6)
  np.testing.assert_allclose(aux['ponder'], [[3.2, 2.0], [3.8, 2.4]], atol=1e-6)
  # token (0,1) halts at the first step: w=[1,0,0], N=1, R=1, y = h^1
  np.testing.assert_allclose(aux['weights'][:, 0, 1], [1.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(h_out[0, 1], states[0, 0, 1], atol=1e-6)
  # y = Σ_n w^n h^n with the hand weights (not a UT-style running blend)
  expected = (ACT_W[..., None] * states).sum(0)
  np.testing.assert_allclose(h_out, expected, atol=1e-5)
  blend = np.zeros_like(states[0])
  for n in range(3):
    blend = states[n] * ACT_W[n][..., None] + blend * (1 - ACT_W[n][..., None])
  assert not np.allclose(h_out[0, 0], blend[0, 0], atol=1e-3)


def test_act_eval_threshold_and_train_uses_eps():
  _, _, aux = _act_known(threshold=0.7, train=False)
  np.testing.assert_allclose(aux['weights'][:, 0, 0], [0.3, 0.7, 0.0], atol=1e-6)
  assert int(aux['exit_step'][0, 0]) == 1
  _, _, aux = _act_known(threshold=0.7, train=True)  # training halts at 1 − ε
  np.testing.assert_allclose(aux['weights'], ACT_W, atol=1e-6)


def test_act_bias_must_be_negative():
  assert config_lib.default_config().halting.bias_init < 0
  policy = policy_of('act', 12)
  h0 = jnp.zeros((1, 2, 4))
  for bias, n_expected in ((0.0, 2), (-2.0, 9)):  # b=0: p=0.5 -> everything halts at step 2
    _, aux = run_policy(policy, h0, lambda h, i: h,
                        lambda h, i, b=bias: {'halt_logit': jnp.full(h.shape[:2], b)})
    np.testing.assert_array_equal(aux['exit_step'] + 1, n_expected)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('per_sequence', [False, True])
def test_act_invariants_property(dtype, per_sequence):
  N, B, L, D = 6, 3, 5, 8
  policy = policy_of('act', N, per_sequence=per_sequence)
  block_fn_of = lambda W: (lambda h, i: jnp.tanh(h.astype(jnp.float32) @ W + h).astype(dtype))

  def loss_and_aux(params, h0, running):
    W, w, b = params
    sig = lambda h, i: {'halt_logit': h.astype(jnp.float32) @ w + b}
    h_out, aux = drive(policy, h0, block_fn_of(W), sig, None, True, running)
    _, extra = policy.loss_terms(aux, jnp.zeros((B, L), jnp.int32), running.astype(jnp.float32))
    return jnp.sum(h_out.astype(jnp.float32)) + extra['ponder'], (h_out, aux)

  grad_fn = jax.jit(jax.value_and_grad(loss_and_aux, has_aux=True))
  for seed in range(4):
    rng = np.random.default_rng(seed)
    params = (jnp.asarray(rng.normal(size=(D, D)) / math.sqrt(D), jnp.float32),
              jnp.asarray(rng.normal(size=(D,)), jnp.float32),
              jnp.float32(rng.uniform(-10, 10)))
    h0 = jnp.asarray(rng.normal(size=(B, L, D)), dtype)
    running = jnp.asarray(rng.uniform(size=(B, L)) > 0.2)
    (_, (h_out, aux)), grads = grad_fn(params, h0, running)
    ran = np.asarray(running)
    w_sum = np.asarray(aux['weights']).sum(0)
    np.testing.assert_allclose(w_sum[ran], 1.0, atol=1e-6)
    np.testing.assert_allclose(w_sum[~ran], 0.0)
    n_steps = np.asarray(aux['exit_step']) + 1
    assert np.all((n_steps >= 1) & (n_steps <= N))
    np.testing.assert_array_equal(np.asarray(aux['num_layers'])[ran], n_steps[ran])
    r = np.asarray(aux['remainder'])
    assert np.all((r[ran] > 0) & (r[ran] <= 1))
    assert h_out.dtype == dtype and np.all(np.isfinite(np.asarray(h_out, np.float32)))
    np.testing.assert_array_equal(np.asarray(h_out)[~ran], np.asarray(h0)[~ran])
    np.testing.assert_allclose(np.asarray(aux['ponder'])[ran], (n_steps + r)[ran], rtol=1e-6)
    for g in jax.tree.leaves(grads):
      assert np.all(np.isfinite(np.asarray(g)))
    if per_sequence:  # a row halts as one (valid tokens only)
      for b in range(B):
        assert len(set(n_steps[b][ran[b]].tolist())) <= 1


def test_act_ponder_gradient_only_through_remainder():
  policy = policy_of('act', 3)
  h0 = jnp.zeros((1, 1, 2))

  def ponder(logits_N):
    _, aux = drive(policy, h0, lambda h, i: h + 1.0,
                   lambda h, i: {'halt_logit': jnp.broadcast_to(logits_N[i], (1, 1))})
    return aux['ponder'][0, 0]

  x = jnp.asarray(logit([0.3, 0.5, 0.4]), jnp.float32)
  g = jax.grad(ponder)(x)
  # ρ = 3 + 1 − p0 − p1: dρ/dx_n = −p_n(1−p_n) for the non-halting steps, 0 for the last
  np.testing.assert_allclose(g, [-0.21, -0.25, 0.0], atol=1e-6)


# ---------------------------------------------------------------- PonderNet

def _ponder_aux(lams_N, train, threshold=None, **cfg):
  N = len(lams_N) + 1
  table = np.zeros((N, 1, 1), np.float32)
  table[:-1, 0, 0] = logit(lams_N)
  policy = policy_of('pondernet', N, **cfg)
  return policy, run_policy(policy, jnp.zeros((1, 1, 2)), lambda h, i: h + 1.0,
                            table_signal('halt_logit', table), threshold, train)[1]


def test_pondernet_distribution_sums_to_one():
  N, B, L = 5, 2, 3
  rng = np.random.default_rng(1)
  logits = rng.normal(scale=3.0, size=(N, B, L)).astype(np.float32)
  policy = policy_of('pondernet', N)
  _, aux = run_policy(policy, jnp.zeros((B, L, 2)), lambda h, i: h,
                      table_signal('halt_logit', logits), train=True)
  p = np.asarray(aux['p'])
  np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)
  lam = 1 / (1 + np.exp(-logits.astype(np.float64)))
  surv = np.cumprod(np.concatenate([np.ones((1, B, L)), 1 - lam[:-1]]), axis=0)
  expected = np.concatenate([lam[:-1] * surv[:-1], surv[-1:]])
  np.testing.assert_allclose(p, expected, atol=1e-6)
  np.testing.assert_array_equal(aux['exit_step'], N - 1)  # training runs every step


def test_pondernet_kl_known_value_and_direction():
  # λ = [0.5, 0.4] over 3 steps -> p = [0.5, 0.2, 0.3]; λ_p = 0.5 -> p_G = [4/7, 2/7, 1/7]
  policy, aux = _ponder_aux([0.5, 0.4], True, lambda_p=0.5, beta=1.0)
  np.testing.assert_allclose(aux['p'][:, 0, 0], [0.5, 0.2, 0.3], atol=1e-6)
  np.testing.assert_allclose(np.exp(geometric_log_prior(0.5, 3)), [4 / 7, 2 / 7, 1 / 7],
                             rtol=1e-6)
  aux = dict(aux, step_logits=jnp.zeros((3, 1, 1, 4)))
  _, extra = policy.loss_terms(aux, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)))
  kl_p_pg = 0.5 * math.log(0.5 * 7 / 4) + 0.2 * math.log(0.2 * 7 / 2) + 0.3 * math.log(0.3 * 7)
  kl_pg_p = (4 / 7) * math.log((4 / 7) / 0.5) + (2 / 7) * math.log((2 / 7) / 0.2) + \
            (1 / 7) * math.log((1 / 7) / 0.3)
  assert abs(kl_p_pg - 0.08448) < 1e-4 and abs(kl_pg_p - 0.07222) < 1e-4
  np.testing.assert_allclose(extra['kl'], kl_p_pg, atol=1e-5)
  assert abs(float(extra['kl']) - kl_pg_p) > 5e-3  # the reversed KL(p_G‖p) is wrong


def test_pondernet_kl_zero_at_prior():
  N, lam_p = 4, 0.3
  pg = np.exp(geometric_log_prior(lam_p, N).astype(np.float64))
  lams = [pg[n] / (1 - pg[:n].sum()) for n in range(N - 1)]  # λ that reproduce p_G exactly
  policy, aux = _ponder_aux(lams, True, lambda_p=lam_p, beta=1.0)
  np.testing.assert_allclose(aux['p'][:, 0, 0], pg, atol=1e-6)
  aux = dict(aux, step_logits=jnp.zeros((N, 1, 1, 3)))
  _, extra = policy.loss_terms(aux, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)))
  assert abs(float(extra['kl'])) < 1e-6


def test_pondernet_expected_task_loss():
  policy, aux = _ponder_aux([0.5, 0.4], True, beta=0.0)
  V, a = 4, np.array([2.0, -1.0, 0.5])
  logits = np.zeros((3, 1, 1, V), np.float32)
  logits[:, 0, 0, 1] = a  # the target is class 1
  ce = -a + np.log(np.exp(a) + V - 1)
  aux = dict(aux, step_logits=jnp.asarray(logits))
  task, extra = policy.loss_terms(aux, jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1)))
  np.testing.assert_allclose(task, (np.array([0.5, 0.2, 0.3]) * ce).sum(), rtol=1e-5)
  assert float(extra['kl']) == 0.0  # β = 0


@pytest.mark.parametrize('threshold,exit_step', [(0.4, 0), (0.6, 1), (0.75, 2)])
def test_pondernet_eval_threshold(threshold, exit_step):
  _, aux = _ponder_aux([0.5, 0.4], False, threshold)  # cumulative p = [0.5, 0.7, 1.0]
  assert int(aux['exit_step'][0, 0]) == exit_step
  assert int(aux['num_layers'][0, 0]) == exit_step + 1


def test_pondernet_sampling():
  N = 3
  logits = np.zeros((N, 1, 2), np.float32)  # λ = 0.5 everywhere
  uniform = np.array([[[0.9, 0.3]], [[0.1, 0.9]], [[0.9, 0.9]]], np.float32)
  policy = policy_of('pondernet', N, sample=True)
  sig = lambda h, i: {'halt_logit': jnp.asarray(logits)[i], 'uniform': jnp.asarray(uniform)[i]}
  _, aux = run_policy(policy, jnp.zeros((1, 2, 2)), lambda h, i: h, sig, 0.99)
  np.testing.assert_array_equal(aux['exit_step'], [[1, 0]])  # halt when uniform < λ_n


# ---------------------------------------------------------------- confidence (CALM)

def _conf_logits(top_probs_NL, V=5):
  """exit logits [N,1,L,V] with the given top-1 probabilities."""
  top = np.asarray(top_probs_NL)
  out = np.zeros(top.shape + (V,), np.float32)
  for idx in np.ndindex(top.shape):
    out[idx] = peaked_logits(top[idx], V)
  return out[:, None]


@pytest.mark.parametrize('train', [False, True])
def test_confidence_softmax_exits_when_confident(train):
  top = [[0.3, 0.3, 0.95], [0.95, 0.3, 0.5], [0.3, 0.3, 0.5], [0.3, 0.3, 0.5]]  # [N=4, L=3]
  policy = policy_of('confidence', 4, criterion='softmax')
  _, aux = run_policy(policy, jnp.zeros((1, 3, 2)), tanh_block(0, 2),
                      table_signal('exit_logits', _conf_logits(top)), 0.9, train)
  np.testing.assert_array_equal(aux['criterion_step'], [[1, 3, 0]])
  np.testing.assert_array_equal(aux['exit_step'], [[3, 3, 3]] if train else [[1, 3, 0]])
  np.testing.assert_allclose(aux['confidence'][1, 0, 0], 0.95, atol=1e-5)
  assert aux['step_logits'].shape == (4, 1, 3, 5)


def test_confidence_margin_differs_from_softmax():
  V = 3
  logits = np.zeros((2, 1, 1, V), np.float32)
  logits[0, 0, 0] = np.log([0.6, 0.35, 0.05])  # top-1 0.6, margin 0.25
  logits[1, 0, 0] = np.log([0.1, 0.8, 0.1])  # margin 0.7
  exits = {}
  for crit in ('softmax', 'margin'):
    policy = policy_of('confidence', 2, criterion=crit)
    _, aux = run_policy(policy, jnp.zeros((1, 1, 2)), lambda h, i: h,
                        table_signal('exit_logits', logits), 0.5)
    exits[crit] = int(aux['exit_step'][0, 0])
    if crit == 'margin':
      np.testing.assert_allclose(aux['confidence'][:, 0, 0], [0.25, 0.7], atol=1e-6)
  assert exits == {'softmax': 0, 'margin': 1}


def test_confidence_saturation():
  N, L, D = 4, 2, 16
  rng = np.random.default_rng(3)
  noise = 10 * rng.normal(size=(N, 1, L, D)).astype(np.float32)
  noise[1:, 0, 0] = 0.0  # token 0 stops moving after step 0 -> cos(h^1, h^0) = 1
  policy = policy_of('confidence', N, criterion='saturation')
  block = lambda h, i: h + jnp.asarray(noise)[i]
  _, aux = run_policy(policy, jnp.asarray(rng.normal(size=(1, L, D)), jnp.float32), block,
                      lambda h, i: {}, 0.99)
  np.testing.assert_array_equal(aux['exit_step'], [[1, N - 1]])
  np.testing.assert_allclose(aux['confidence'][1, 0, 0], 1.0, atol=1e-6)


def test_confidence_frozen_token_state_never_changes():
  N, B, L, D = 5, 2, 3, 6
  rng = np.random.default_rng(4)
  top = rng.choice([0.3, 0.97], size=(N, B, L), p=[0.7, 0.3])
  logits = np.stack([_conf_logits(top[:, b])[:, 0] for b in range(B)], 1)
  block = tanh_block(5, D)
  h0 = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  policy = policy_of('confidence', N)
  h_out, aux = run_policy(policy, h0, block, table_signal('exit_logits', logits), 0.9)
  ref = np.asarray(reference_trajectory(block, h0, N))
  e = np.asarray(aux['exit_step'])
  first = np.where((top >= 0.9).any(0), (top >= 0.9).argmax(0), N - 1)
  np.testing.assert_array_equal(e, first)
  for b, t in np.ndindex(B, L):
    np.testing.assert_allclose(h_out[b, t], ref[e[b, t], b, t], atol=1e-6)
  np.testing.assert_array_equal(aux['num_layers'], e + 1)
  # the telemetry of a stopped token stays 0 after its exit
  conf = np.asarray(aux['confidence'])
  for b, t in np.ndindex(B, L):
    assert np.all(conf[e[b, t] + 1:, b, t] == 0)


def test_confidence_exit_every():
  assert policy_of('confidence', 4, exit_every=2).exit_steps() == (1, 3)
  assert policy_of('confidence', 5, exit_every=2).exit_steps() == (1, 3, 4)
  assert policy_of('confidence', 4, exit_every=4).exit_steps() == (3,)
  assert policy_of('act', 4, exit_every=2).exit_steps() == (0, 1, 2, 3)
  top = [[0.95, 0.95], [0.3, 0.95], [0.95, 0.95], [0.3, 0.3]]  # [N=4, L=2]
  policy = policy_of('confidence', 4, exit_every=2)
  _, aux = run_policy(policy, jnp.zeros((1, 2, 2)), lambda h, i: h,
                      table_signal('exit_logits', _conf_logits(top)), 0.9)
  # token 0 is confident at steps 0 and 2, neither an exit -> runs to the end
  np.testing.assert_array_equal(aux['exit_step'], [[3, 1]])


def test_confidence_per_sequence_uses_min():
  top = [[0.95, 0.3], [0.95, 0.95], [0.3, 0.3]]  # [N=3, L=2]
  policy = policy_of('confidence', 3, per_sequence=True)
  # at step 0 the mean (0.625) passes 0.6 but the min (0.3) does not: the row waits for step 1
  _, aux = run_policy(policy, jnp.zeros((1, 2, 2)), lambda h, i: h,
                      table_signal('exit_logits', _conf_logits(top)), 0.6)
  np.testing.assert_array_equal(aux['exit_step'], [[1, 1]])


@pytest.mark.parametrize('kind,exits,N,k', [('linear', (0, 1, 2), 3, 1),
                                            ('uniform', (0, 1, 2), 3, 1),
                                            ('linear', (1, 3), 4, 2)])
def test_exit_loss_weighting(kind, exits, N, k):
  V = 4
  a = np.linspace(-1.0, 2.0, N)
  logits = np.zeros((N, 1, 2, V), np.float32)
  logits[:, 0, :, 2] = a[:, None]  # target class 2
  ce = -a + np.log(np.exp(a) + V - 1)
  omega = np.array([s + 1.0 if kind == 'linear' else 1.0 for s in exits])
  expected = (omega * ce[list(exits)]).sum() / omega.sum()
  policy = policy_of('confidence', N, exit_weights=kind, exit_every=k)
  task, extra = jax.jit(policy.loss_terms)({'step_logits': jnp.asarray(logits)},
                                           jnp.full((1, 2), 2, jnp.int32), jnp.ones((1, 2)))
  np.testing.assert_allclose(task, expected, rtol=1e-5)
  assert extra == {}


# ---------------------------------------------------------------- learned exit

def test_learned_exit_labels_and_bce():
  V = 3
  argmax = np.array([[0, 0, 2], [1, 1, 1], [0, 1, 2]])  # [N=3, L=3]; last row = final
  logits = np.zeros((3, 1, 3, V), np.float32)
  for n, t in np.ndindex(3, 3):
    logits[n, 0, t, argmax[n, t]] = 3.0
  labels = np.asarray(exit_labels(jnp.asarray(logits)))[:, 0]
  np.testing.assert_array_equal(labels, [[1, 0, 1], [0, 1, 0], [1, 1, 1]])

  c = np.array([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [9.0, 9.0, 9.0]], np.float32)
  policy = policy_of('learned_exit', 3, classifier_loss_weight=1.0)
  aux = {'step_logits': jnp.asarray(logits), 'exit_classifier_logit': jnp.asarray(c)[:, None]}
  targets, weights = jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3))
  _, extra = jax.jit(policy.loss_terms)(aux, targets, weights)
  s, y = 1 / (1 + np.exp(-c[:2].astype(np.float64))), labels[:2]  # the last step is left out
  bce = -(y * np.log(s) + (1 - y) * np.log(1 - s)).mean()
  np.testing.assert_allclose(extra['exit_bce'], bce, rtol=1e-5)

  def bce_of(step_logits, cls_logit):
    a = {'step_logits': step_logits, 'exit_classifier_logit': cls_logit}
    return policy.loss_terms(a, targets, weights)[1]['exit_bce']

  g_logits, g_cls = jax.jit(jax.grad(bce_of, argnums=(0, 1)))(aux['step_logits'],
                                                              aux['exit_classifier_logit'])
  assert np.all(np.asarray(g_logits) == 0)  # labels carry no gradient
  assert np.any(np.asarray(g_cls) != 0)


def test_learned_exit_exits_on_classifier():
  p = np.array([[0.5, 0.85], [0.95, 0.85], [0.1, 0.1]])  # [N=3, L=2] σ(c)
  c = logit(p).astype(np.float32)[:, None]
  policy = policy_of('learned_exit', 3)
  V = 4
  sig = lambda h, i: {'exit_classifier_logit': jnp.asarray(c)[i],
                      'exit_logits': jnp.zeros((1, 2, V))}
  for thr, expected in ((0.9, [[1, 2]]), (0.8, [[1, 0]])):
    _, aux = run_policy(policy, jnp.zeros((1, 2, 2)), lambda h, i: h, sig, thr)
    np.testing.assert_array_equal(aux['exit_step'], expected)
  np.testing.assert_allclose(aux['exit_prob'][0, 0], [0.5, 0.85], atol=1e-6)
  assert aux['exit_classifier_logit'].shape == (3, 1, 2)


# ---------------------------------------------------------------- MoD

def test_mod_capacity_rule():
  n = jnp.asarray([10, 5, 4, 0, 1, 8, 100, 50])
  # ceil(capacity·n); f32 0.3·100 = 30.000002 must still give 30
  np.testing.assert_array_equal(mod_capacity_k(n, 0.3), [3, 2, 2, 0, 1, 3, 30, 15])
  np.testing.assert_array_equal(mod_capacity_k(n, 0.5), [5, 3, 2, 0, 1, 4, 50, 25])
  np.testing.assert_array_equal(mod_capacity_k(n, 1.0), n)
  np.testing.assert_array_equal(mod_capacity_k(n, 1e-6), [1, 1, 1, 0, 1, 1, 1, 1])


def test_mod_route_topk_among_running():
  r = jnp.asarray([[5.0, 1.0, 4.0, -1.0, 3.0, 2.0, 0.5, 9.0],
                   [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
  running = jnp.asarray([[True] * 6 + [False] * 2, [True] * 8])
  sel, gate = mod_route(r, 0.5, running)
  # row 0: 6 running -> k = 3: scores 5, 4, 3 (the 9.0 token is not running)
  np.testing.assert_array_equal(sel[0], [1, 0, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(sel[1], [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_allclose(gate, np.where(sel, jax.nn.sigmoid(r), 0.0), atol=1e-7)
  g = jax.grad(lambda x: mod_route(x, 0.5, running)[1].sum())(r)
  s = jax.nn.sigmoid(r)
  np.testing.assert_allclose(g, np.where(sel, s * (1 - s), 0.0), atol=1e-7)


def test_mod_predictor_loss_and_decode():
  pred = jnp.asarray([[2.0, -1.0, 0.0]])
  sel = jnp.asarray([[True, True, False]])
  w = jnp.asarray([[1.0, 1.0, 0.0]])
  expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
  np.testing.assert_allclose(mod_predictor_loss(pred, sel, w), expected, rtol=1e-6)
  np.testing.assert_array_equal(mod_decode_select(pred, jnp.asarray([[True, True, False]])),
                                [[True, False, False]])
  assert POLICIES['mod'].gates_blocks
  assert not any(POLICIES[n].gates_blocks for n in POLICIES if n != 'mod')
  policy = policy_of('mod', 2, classifier_loss_weight=2.0)
  _, extra = policy.loss_terms({'mod_pred_logit': pred[None], 'mod_selected': sel[None]},
                               jnp.zeros((1, 3), jnp.int32), w)
  np.testing.assert_allclose(extra['mod_predictor'], 2 * expected, rtol=1e-6)


# ---------------------------------------------------------------- none / all policies

@pytest.mark.parametrize('name', ['none', 'mod'])
def test_none_runs_every_step(name):
  N, B, L, D = 4, 2, 3, 5
  policy = policy_of(name, N)
  h0 = jnp.asarray(np.random.default_rng(6).normal(size=(B, L, D)), jnp.float32)
  states = np.random.default_rng(7).normal(size=(N, B, L, D)).astype(np.float32)
  h = h0
  state = policy.init(h)
  running = jnp.ones((B, L), bool)
  for i in range(N):
    state, run_next, _ = policy.step(state, h, jnp.asarray(states[i]), {}, jnp.int32(i),
                                     jnp.float32(0.5), running, False)
    expected_running = i < N - 1  # running until the last step, then nobody
    np.testing.assert_array_equal(run_next, expected_running)
    h = jnp.asarray(states[i])
  h_out, aux = policy.finalize(state, h, {})
  assert h_out is h
  np.testing.assert_array_equal(aux['exit_step'], N - 1)
  _, aux = run_policy(policy, h0, tanh_block(0, D), lambda h, i: {})
  np.testing.assert_array_equal(aux['num_layers'], N)


def _signals_for(policy, V=5, seed=0):
  rng = np.random.default_rng(seed)
  wh = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  E = jnp.asarray(rng.normal(size=(3, V)), jnp.float32)

  def sig(h, i):
    h = h.astype(jnp.float32)
    out = {}
    if policy.needs_halt_unit:
      out['halt_logit'] = h @ wh - 1.0
    if policy.needs_exit_logits:
      out['exit_logits'] = 3.0 * h @ E
    if policy.needs_exit_classifier:
      out['exit_classifier_logit'] = jax.lax.stop_gradient(h) @ wh
    return out
  return sig


@pytest.mark.parametrize('name', sorted(POLICIES))
def test_padding_never_runs_and_grads_finite(name):
  N, B, L, D = 4, 2, 3, 3
  policy = policy_of(name, N)
  rng = np.random.default_rng(8)
  h0 = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  running = jnp.asarray([[True, True, False], [True, False, False]])
  sig = _signals_for(policy)

  def loss(W, train):
    block = lambda h, i: jnp.tanh(h @ W)
    h_out, aux = drive(policy, h0, block, sig, None, train, running)
    task, extra = policy.loss_terms(aux, jnp.ones((B, L), jnp.int32), running.astype(jnp.float32))
    total = jnp.sum(h_out) + (0.0 if task is None else task) + sum(extra.values())
    return total, (h_out, aux)

  W = jnp.asarray(rng.normal(size=(D, D)), jnp.float32)
  for train in (False, True):
    (val, (h_out, aux)), g = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                     static_argnums=1)(W, train)
    pad = ~np.asarray(running)
    np.testing.assert_array_equal(np.asarray(h_out)[pad], np.asarray(h0)[pad])
    np.testing.assert_array_equal(np.asarray(aux['num_layers'])[pad], 0)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
    assert aux['exit_step'].shape == (B, L) and aux['exit_step'].dtype == jnp.int32


@pytest.mark.parametrize('name', sorted(POLICIES))
@pytest.mark.parametrize('train', [False, True])
def test_state_unchanged_for_stopped_tokens(name, train):
  N, B, L, D = 4, 2, 3, 3
  policy = policy_of(name, N, sample=True)
  rng = np.random.default_rng(10)
  sig = _signals_for(policy, seed=2)
  h0 = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  h1 = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  extra = {'uniform': jnp.full((B, L), 0.5)}
  state, _, _ = policy.step(policy.init(h0), h0, h1, {**sig(h1, 0), **extra}, jnp.int32(0),
                            jnp.float32(0.5), jnp.ones((B, L), bool), train)
  stopped = jnp.asarray(rng.uniform(size=(B, L)) > 0.5)
  h2 = jnp.where(stopped[..., None], h1, jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32))
  new_state, run_next, _ = policy.step(state, h1, h2, {**sig(h2, 1), **extra}, jnp.int32(1),
                                       jnp.float32(0.5), ~stopped, train)
  assert not np.any(np.asarray(run_next)[np.asarray(stopped)])
  for key in state:
    old, new = np.asarray(state[key]), np.asarray(new_state[key])
    np.testing.assert_array_equal(new[np.asarray(stopped)], old[np.asarray(stopped)], err_msg=key)


@pytest.mark.parametrize('name', ['act', 'pondernet', 'confidence', 'learned_exit', 'none'])
def test_step_compiled_once_across_thresholds(name):
  N, B, L, D = 4, 1, 3, 3
  policy = policy_of(name, N)
  sig = _signals_for(policy, seed=1)
  block = tanh_block(2, D)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(h0, thr):
    return drive(policy, h0, block, sig, thr, False)[1]['exit_step']

  h0 = jnp.asarray(np.random.default_rng(9).normal(size=(B, L, D)), jnp.float32)
  exits = [np.asarray(f(h0, t)) for t in (0.3, 0.6, 0.95)]
  if name != 'none':  # a higher threshold never exits earlier
    assert np.all(exits[0] <= exits[1]) and np.all(exits[1] <= exits[2])


# ---------------------------------------------------------------- validation

BAD = [
    ('name', 'bogus', 4, 'halting.name'),
    ('threshold', 0.0, 4, 'halting.threshold'),
    ('threshold', 1.5, 4, 'halting.threshold'),
    ('threshold', 'high', 4, 'halting.threshold'),
    ('eps', 0.0, 4, 'halting.eps'),
    ('eps', 1.0, 4, 'halting.eps'),
    (None, None, 0, 'num_steps'),
    ('exit_every', 0, 4, 'halting.exit_every'),
    ('exit_every', 5, 4, 'beyond depth'),
    ('mod_capacity', 0.0, 4, 'halting.mod_capacity'),
    ('mod_capacity', 1.2, 4, 'halting.mod_capacity'),
    ('criterion', 'entropy', 4, 'halting.criterion'),
    ('exit_weights', 'quadratic', 4, 'halting.exit_weights'),
    ('ponder_cost', -0.1, 4, 'halting.ponder_cost'),
    ('beta', -1.0, 4, 'halting.beta'),
    ('lambda_p', 0.0, 4, 'halting.lambda_p'),
    ('lambda_p', 1.0, 4, 'halting.lambda_p'),
    ('bias_init', float('nan'), 4, 'halting.bias_init'),
    ('bias_init', float('inf'), 4, 'halting.bias_init'),
    ('exit_aware', -0.1, 4, 'halting.exit_aware'),
    ('exit_aware', 1.0, 4, 'halting.exit_aware'),
    ('distill', -1.0, 4, 'halting.distill'),
]


def test_exit_aware_needs_an_early_exit_policy():
  with pytest.raises(ConfigError, match=r"exit_aware=0\.5 needs a policy that supports "
                     r"exit-aware training \(confidence, learned_exit\); halting.name='act'"):
    validate_halting(make_cfg(name='act', exit_aware=0.5), 4)
  for name in ('confidence', 'learned_exit'):
    validate_halting(make_cfg(name=name, exit_aware=0.5), 4)


@pytest.mark.parametrize('field,value,num_steps,msg', BAD)
def test_validate_halting_rejects(field, value, num_steps, msg):
  cfg = make_cfg(**{'name': 'confidence', **({} if field is None else {field: value})})
  with pytest.raises(ConfigError, match=msg.replace('.', r'\.')) as err:
    validate_halting(cfg, num_steps)
  assert isinstance(err.value, ValueError)
  if field == 'name':
    assert all(n in str(err.value) for n in POLICIES)  # lists the known names


def test_validate_halting_accepts_defaults_and_edges():
  for name in POLICIES:
    validate_halting(make_cfg(name=name), 1)
    assert make_policy(make_cfg(name=name), 3).name == name
  validate_halting(make_cfg(threshold=1.0, mod_capacity=1.0, exit_every=4), 4)


def test_exit_distill_kl_known_answer():
  """KL(p_last ‖ p_l) by hand for V=2, N=3: exits 0 and 1, last step held fixed."""
  z = np.zeros((3, 1, 2, 2), np.float32)
  z[0, 0, 0] = [0.0, 0.0]            # p = (0.5, 0.5)
  z[1, 0, 0] = [np.log(3.0), 0.0]    # p = (0.75, 0.25)
  z[2, 0, 0] = [np.log(4.0), 0.0]    # last: p = (0.8, 0.2)
  z[:, 0, 1] = [1.0, -1.0]           # token 2: every step equal -> KL 0
  kl = lambda p, q: sum(a * np.log(a / b) for a, b in zip(p, q))
  want0 = (kl((0.8, 0.2), (0.5, 0.5)) + 0.0) / 2
  want1 = (kl((0.8, 0.2), (0.75, 0.25)) + 0.0) / 2
  got = exit_distill_kl(jnp.asarray(z), jnp.ones((1, 2)), (0, 1))
  np.testing.assert_allclose(float(got), (want0 + want1) / 2, rtol=1e-5)
  # padding weight 0 on token 2 drops it from the means
  got = exit_distill_kl(jnp.asarray(z), jnp.asarray([[1.0, 0.0]]), (0, 1))
  np.testing.assert_allclose(float(got), want0 + want1, rtol=1e-5)
  # the gradient reaches only the exits, never the (fixed) last step
  g = jax.grad(lambda x: exit_distill_kl(x, jnp.ones((1, 2)), (0, 1)))(jnp.asarray(z))
  assert np.abs(np.asarray(g[2])).max() == 0 and np.abs(np.asarray(g[0])).max() > 0


def test_distill_weight_adds_a_loss_term():
  policy = make_policy(make_cfg(name='confidence', distill=0.5), 3)
  z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 4, 7)), jnp.float32)
  targets, w = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4))
  task, extra = policy.loss_terms({'step_logits': z}, targets, w)
  np.testing.assert_allclose(float(extra['exit_distill']),
                             0.5 * float(exit_distill_kl(z, w, (0, 1))), rtol=1e-6)
  le = make_policy(make_cfg(name='learned_exit', distill=0.5), 3)
  aux = {'step_logits': z, 'exit_classifier_logit': jnp.zeros((3, 2, 4))}
  assert set(le.loss_terms(aux, targets, w)[1]) == {'exit_distill', 'exit_bce'}
  assert make_policy(make_cfg(name='confidence'), 3).loss_terms(
      {'step_logits': z}, targets, w)[1] == {}
