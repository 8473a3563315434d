"""Mixture-of-experts: known-answer routing, losses, dispatch paths, masks, balancing, config.

All expected numbers below are computed by hand (softmax of small integer logits):
  softmax([2, 0]) = (0.880797, 0.119203)    softmax([0, 1]) = (0.268941, 0.731059)
  softmax([3, 0]) = (0.952574, 0.047426)    softmax([1, 0]) = (0.731059, 0.268941)
  softmax([4, 0]) = (0.982014, 0.017986)    softmax([2, 1, 0]) = (0.665241, 0.244728, 0.090031)
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax.errors import ConfigError
from act_jax.model.layers.mlp import GatedMLP
from act_jax.model.moe import ROUTERS, MoEFFN, capacity, update_bias, validate_moe
from act_jax.model.moe import dispatch as Dp
from act_jax.model.moe import routers as R
from act_jax.model.moe.layer import router_aux as _router_aux

# jitted once per shape: eager op-by-op dispatch of the routers is much slower to run here
top_k_route = jax.jit(R.top_k_route, static_argnums=(1, 2),
                      static_argnames=('renormalize', 'priority'))
expert_choice_route = jax.jit(R.expert_choice_route, static_argnums=(1,))
hash_route = jax.jit(R.hash_route, static_argnums=(1, 2))
soft_route = jax.jit(R.soft_route, static_argnums=(1,))
router_aux = jax.jit(_router_aux, static_argnums=(2, 3))

LOGITS_TOP1 = jnp.array([[[2., 0.], [0., 1.], [3., 0.], [1., 0.]]])  # [G=1, S=4, E=2]


def _cfg(**kw):
  """A MoESpec: config.default_config().moe with router top_k and the given fields."""
  return config_lib.moe_spec(**{'router': 'top_k', **kw})


# ----------------------------------------------------------------------------- routing

def test_switch_top1_known_answer():
  c = capacity(4, 2, 1, 1.0)
  assert c == 2
  plan = top_k_route(LOGITS_TOP1, 1, c, renormalize=False)
  np.testing.assert_array_equal(plan.expert_index_GSK[0, :, 0], [0, 1, 0, 0])
  np.testing.assert_array_equal(plan.slot_index_GSK[0, :, 0], [0, 0, 1, -1])  # t3: e0 full
  np.testing.assert_allclose(plan.combine_weight_GSK[0, :, 0],
                             [0.880797, 0.731059, 0.952574, 0.0], atol=1e-6)
  np.testing.assert_array_equal(plan.token_for_slot_GEC[0], [[0, 2], [1, -1]])
  np.testing.assert_allclose(plan.weight_GEC[0], [[0.880797, 0.952574], [0.731059, 0.0]],
                             atol=1e-6)
  # renormalize is ignored for K = 1 (Switch keeps p_e; renormalised weights would all be 1
  # and give the router no task-loss gradient): same weights as above
  plan = top_k_route(LOGITS_TOP1, 1, c, renormalize=True)
  np.testing.assert_allclose(plan.combine_weight_GSK[0, :, 0],
                             [0.880797, 0.731059, 0.952574, 0.0], atol=1e-6)


def test_top2_known_answer_all_first_choices_first():
  logits = jnp.array([[[2., 1., 0.], [2., 0., 1.], [1., 2., 0.]]])  # [1, 3, 3]
  c = capacity(3, 3, 2, 1.0)
  assert c == 2
  plan = top_k_route(logits, 2, c, renormalize=False)
  np.testing.assert_array_equal(plan.expert_index_GSK[0], [[0, 1], [0, 2], [1, 0]])
  # t2's 1st choice (e1) beats t0's 2nd choice; t2's 2nd choice finds e0 full.
  np.testing.assert_array_equal(plan.slot_index_GSK[0], [[0, 1], [1, 0], [0, -1]])
  np.testing.assert_array_equal(plan.token_for_slot_GEC[0], [[0, 1], [2, 0], [1, -1]])
  np.testing.assert_allclose(plan.combine_weight_GSK[0],
                             [[0.665241, 0.244728], [0.665241, 0.244728], [0.665241, 0.0]],
                             atol=1e-6)
  plan = top_k_route(logits, 2, c, renormalize=True)  # renormalised BEFORE dropping
  np.testing.assert_allclose(plan.combine_weight_GSK[0],
                             [[0.731059, 0.268941], [0.731059, 0.268941], [0.731059, 0.0]],
                             atol=1e-6)


def test_priority_probability_changes_who_is_dropped():
  logits = jnp.array([[[2., 0.], [0., 1.], [3., 0.], [4., 0.]]])  # e0 wanted by t0, t2, t3
  by_pos = top_k_route(logits, 1, 2, renormalize=False, priority='position')
  np.testing.assert_array_equal(by_pos.slot_index_GSK[0, :, 0], [0, 0, 1, -1])
  by_prob = top_k_route(logits, 1, 2, renormalize=False, priority='probability')
  # max probs: t0 .8808, t2 .9526, t3 .9820 -> t3 slot 0, t2 slot 1, t0 dropped
  np.testing.assert_array_equal(by_prob.slot_index_GSK[0, :, 0], [-1, 0, 1, 0])
  np.testing.assert_array_equal(by_prob.token_for_slot_GEC[0], [[3, 2], [1, -1]])
  np.testing.assert_allclose(by_prob.combine_weight_GSK[0, :, 0],
                             [0.0, 0.731059, 0.952574, 0.982014], atol=1e-6)


def test_expert_choice_known_answer():
  logits = jnp.array([[[2., 0.], [0., 1.], [1., 0.], [-2., 0.]]])
  c = capacity(4, 2, 1, 1.0)
  plan = expert_choice_route(logits, c)
  np.testing.assert_array_equal(plan.token_for_slot_GEC[0], [[0, 2], [3, 1]])
  np.testing.assert_allclose(plan.weight_GEC[0], [[0.880797, 0.731059], [0.880797, 0.731059]],
                             atol=1e-6)
  halted = expert_choice_route(logits, c, jnp.array([[False, True, True, True]]))
  np.testing.assert_array_equal(halted.token_for_slot_GEC[0], [[2, 1], [3, 1]])
  # only one running token: the second slot of each expert stays empty
  one = expert_choice_route(logits, c, jnp.array([[False, True, False, False]]))
  np.testing.assert_array_equal(one.token_for_slot_GEC[0], [[1, -1], [1, -1]])
  np.testing.assert_allclose(one.weight_GEC[0], [[0.268941, 0.0], [0.731059, 0.0]], atol=1e-6)


def test_hash_router_known_answer():
  ids = jnp.array([[0, 1, 2, 3, 1000]])
  # (id * 2654435761 mod 2^32) mod 5: 0, 2654435761 -> 1, 1013904226 -> 1, 3668339987 -> 2,
  # 145972072 -> 2
  plan = hash_route(ids, 5, 1)
  np.testing.assert_array_equal(plan.expert_index_GSK[0, :, 0], [0, 1, 1, 2, 2])
  np.testing.assert_array_equal(plan.slot_index_GSK[0, :, 0], [0, 0, -1, 0, -1])
  np.testing.assert_allclose(plan.combine_weight_GSK[0, :, 0], [1, 1, 0, 1, 0])


def test_running_mask_frees_capacity():
  # t3 was dropped (e0 full); halting t0 lets t3 in, and t0 takes no slot.
  run = jnp.array([[False, True, True, True]])
  plan = top_k_route(LOGITS_TOP1, 1, 2, renormalize=False, running_GS=run)
  np.testing.assert_array_equal(plan.expert_index_GSK[0, :, 0], [-1, 1, 0, 0])
  np.testing.assert_array_equal(plan.slot_index_GSK[0, :, 0], [-1, 0, 0, 1])
  np.testing.assert_array_equal(plan.token_for_slot_GEC[0], [[2, 3], [1, -1]])
  aux = router_aux(plan, run, 'top_k', (1, 4))
  np.testing.assert_array_equal(aux['load'], [2, 1])
  np.testing.assert_array_equal(aux['top1_expert'], [[-1, 1, 0, 0]])
  assert float(aux['dropped_frac']) == 0.0


# ----------------------------------------------------------------------------- losses

def test_lb_loss_and_z_loss_known_values():
  run = jnp.ones((1, 4), bool)
  aux = router_aux(top_k_route(LOGITS_TOP1, 1, 2), run, 'top_k', (1, 4))
  # f = (3/4, 1/4); mean p = (0.708343, 0.291657); 2 * (0.75*0.708343 + 0.25*0.291657)
  np.testing.assert_allclose(aux['lb_loss'], 1.208343, atol=1e-5)
  # logsumexp = 2.126928, 1.313262, 3.048587, 1.313262 -> mean of squares
  np.testing.assert_allclose(aux['z_loss'], 4.316755, atol=1e-5)
  np.testing.assert_allclose(aux['dropped_frac'], 0.25)
  np.testing.assert_array_equal(aux['load'], [2, 1])
  np.testing.assert_allclose(aux['max_prob'], (0.880797 + 0.731059 + 0.952574 + 0.731059) / 4,
                             atol=1e-6)


def test_lb_loss_is_one_under_uniform_routing():
  # equal logits: every p_e = 1/E, so E * sum_e f_e / E = 1 whatever the tie-break
  aux = router_aux(top_k_route(jnp.zeros((2, 16, 8)), 2, 8), jnp.ones((2, 16), bool),
                   'top_k', (2, 16))
  np.testing.assert_allclose(aux['lb_loss'], 1.0, atol=1e-6)
  # perfectly balanced first choices too (token s -> expert s mod 4)
  logits = 5.0 * jax.nn.one_hot(jnp.arange(8) % 4, 4)[None]
  aux = router_aux(top_k_route(logits, 1, 8), jnp.ones((1, 8), bool), 'top_k', (1, 8))
  np.testing.assert_allclose(aux['lb_loss'], 1.0, atol=1e-6)


def test_lb_loss_is_per_group():
  # 2 groups, E = 2, K = 1: group 0 sends every token to e0 with logits (2, 0), group 1 every
  # token to e1 with logits (0, 2); a 3rd group is all halted and must not count.
  # Per group: f = (1, 0), mean p = (0.880797, 0.119203) -> 2 * 0.880797 = 1.761594 (the
  # mirror image for group 1); mean over the 2 running groups = 1.761594.
  # Pooled over groups it would be f = (1/2, 1/2), mean p = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1.0
  # (the minimum, with zero gradient) although half the tokens are dropped (C = 2 of S = 4).
  row = jnp.array([2., 0.])
  logits = jnp.stack([jnp.tile(row, (4, 1)), jnp.tile(row[::-1], (4, 1)), jnp.zeros((4, 2))])
  run = jnp.array([[True] * 4, [True] * 4, [False] * 4])
  plan = top_k_route(logits, 1, capacity(4, 2, 1, 1.0), running_GS=run)
  aux = router_aux(plan, run, 'top_k', (3, 4))
  np.testing.assert_allclose(aux['lb_loss'], 2 * 0.880797, atol=1e-5)
  np.testing.assert_allclose(aux['dropped_frac'], 0.5)
  p = np.asarray(plan.probs_GSE)[:2]
  f_pooled = np.eye(2)[np.asarray(plan.first_choice_GS)[:2]].mean((0, 1))
  pooled = 2 * np.sum(f_pooled * p.mean((0, 1)))
  np.testing.assert_allclose(pooled, 1.0, atol=1e-6)
  assert float(aux['lb_loss']) - pooled > 0.7
  # uniform routing is still exactly 1 per group, with one group partly halted
  run = jnp.array([[True] * 4, [True, False, True, False]])
  plan = top_k_route(jnp.zeros((2, 4, 2)), 1, 4, running_GS=run)
  np.testing.assert_allclose(router_aux(plan, run, 'top_k', (2, 4))['lb_loss'], 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- layer

ROUTED = ['top_k', 'dropless', 'expert_choice', 'soft', 'hash']


@functools.lru_cache(maxsize=None)
def _variables(router):
  """One init per router family (init compiles slowly on CPU); params ignore dispatch/shapes."""
  m = MoEFFN(_cfg(router=router, num_experts=4), d_model=8, d_ff=16, causal=False)
  x = jnp.zeros((1, 4, 8))
  return jax.jit(m.init)(jax.random.key(0), x, None, jnp.zeros((1, 4), jnp.int32))


def _run_layer(router, dispatch, x, run=None, ids=None, grad=True, **kw):
  cfg = _cfg(**{**dict(router=router, dispatch=dispatch, num_experts=4, top_k=2,
                       capacity_factor=1.0), **kw})
  m = MoEFFN(cfg, d_model=x.shape[-1], d_ff=16, causal=False)
  v = _variables('top_k' if router == 'dropless' else router)

  def f(params, x):
    y, aux = m.apply({**v, 'params': params}, x, run, ids)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), (y, aux)

  if not grad:
    _, (y, aux) = jax.jit(f)(v['params'], x)
    return y, aux, None, v
  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (_, (y, aux)), grads = step(v['params'], x)
  return y, aux, grads, v


@pytest.mark.parametrize('router', ROUTED)
@pytest.mark.parametrize('other', ['einsum', 'ragged'])
def test_gather_equals_einsum_and_ragged(router, other):
  # capacity_factor 1.0 with K=2 drops assignments: ragged must drop exactly the same ones.
  x = jax.random.normal(jax.random.key(1), (2, 10, 8))
  ids = jax.random.randint(jax.random.key(2), (2, 10), 0, 50)
  run = jax.random.bernoulli(jax.random.key(3), 0.8, (2, 10))
  yg, auxg, gg, _ = _run_layer(router, 'gather', x, run, ids, priority='probability')
  ye, auxe, ge, _ = _run_layer(router, other, x, run, ids, priority='probability')
  if router == 'top_k':
    assert float(auxg['dropped_frac']) > 0   # the case where the paths could differ
  np.testing.assert_allclose(yg, ye, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), gg, ge)
  jax.tree.map(np.testing.assert_array_equal, auxg, auxe)
  assert np.all(np.asarray(yg)[~np.asarray(run)] == 0)   # halted: zero routed output
  assert np.all(np.isfinite(yg))


def test_dropless_equals_top_k_with_enough_capacity():
  x = jax.random.normal(jax.random.key(1), (2, 10, 8))
  y_top, aux_top, g_top, _ = _run_layer('top_k', 'gather', x, capacity_factor=4.0)
  y_dl, aux_dl, g_dl, _ = _run_layer('dropless', 'gather', x, capacity_factor=4.0)
  assert float(aux_top['dropped_frac']) == 0.0
  np.testing.assert_allclose(y_top, y_dl, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_top, g_dl)


@pytest.mark.parametrize('block', [1, 4, 64])
def test_dropless_blocks_match_capacity_buffers(block):
  # sorted block-sparse path == C = S gather buffers, whatever the block size (incl. halted)
  e_ = 4
  logits = jax.random.normal(jax.random.key(8), (2, 10, e_)) * 2.0
  run = jax.random.bernoulli(jax.random.key(9), 0.7, (2, 10))
  x = jax.random.normal(jax.random.key(10), (2, 10, 8))
  w = [jax.random.normal(jax.random.key(i), s_) for i, s_ in
       enumerate([(e_, 8, 16), (e_, 8, 16), (e_, 16, 8)])]

  @jax.jit
  def both(x, logits, w):
    plan = R.top_k_route(logits, 2, 10, running_GS=run)
    y_blk = Dp.dropless_forward(x, plan.expert_index_GSK, plan.combine_weight_GSK, w, e_,
                                block=block)
    return y_blk, Dp.moe_forward(x, plan, w, 'gather', e_)

  y_blk, y_buf = both(x, logits, w)
  np.testing.assert_allclose(y_blk, y_buf, atol=1e-5)
  assert np.all(np.asarray(y_blk)[~np.asarray(run)] == 0)


def test_halted_tokens_zero_output_no_load():
  x = jax.random.normal(jax.random.key(4), (1, 8, 8))
  run = jnp.array([[True, False, True, True, False, True, True, True]])
  y, aux, _, _ = _run_layer('top_k', 'gather', x, run, grad=False)
  assert np.all(np.asarray(y)[0, [1, 4]] == 0)
  assert float(jnp.sum(aux['load'])) <= 6 * 2 and float(jnp.sum(aux['load'])) > 0
  np.testing.assert_array_equal(np.asarray(aux['top1_expert'])[0, [1, 4]], [-1, -1])
  # all tokens halted: all-zero output, finite telemetry (soft MoE softmax over no tokens)
  for router in ('top_k', 'soft', 'expert_choice'):
    y, aux, _, _ = _run_layer(router, 'gather', x, jnp.zeros((1, 8), bool), grad=False)
    assert np.all(np.asarray(y) == 0)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(aux))


def test_dropped_token_gets_exactly_shared_expert():
  x = jax.random.normal(jax.random.key(5), (1, 12, 8))
  cfg = _cfg(router='top_k', num_experts=2, top_k=1, capacity_factor=0.2, shared_experts=1)
  m = MoEFFN(cfg, d_model=8, d_ff=16, causal=False)
  v = jax.jit(m.init)(jax.random.key(0), x)
  y, aux = jax.jit(m.apply)(v, x)
  p = nn.meta.unbox(v['params'])
  shared = GatedMLP(16).apply({'params': p['shared']}, x)
  plan = top_k_route(x @ p['router'], 1, capacity(12, 2, 1, 0.2), renormalize=True)
  dropped = np.asarray(plan.slot_index_GSK[0, :, 0] < 0)
  assert dropped.sum() >= 8   # C = 2 per expert: at most 4 of 12 tokens kept
  np.testing.assert_array_equal(np.asarray(y)[0, dropped], np.asarray(shared)[0, dropped])
  assert not np.allclose(np.asarray(y)[0, ~dropped], np.asarray(shared)[0, ~dropped])
  np.testing.assert_allclose(aux['dropped_frac'], dropped.mean(), atol=1e-6)


def test_top1_router_gets_task_gradient_with_default_renormalize():
  # K = 1 with the default renormalize=True: the combine weight must stay p_e (Switch), not
  # p_e / p_e = 1, else the task loss gives the router ~no gradient (measured 7e-7 vs 6).
  cfg = _cfg(router='top_k', num_experts=2, top_k=1, capacity_factor=2.0)
  assert cfg.renormalize
  m = MoEFFN(cfg, d_model=8, d_ff=16, causal=False)
  x = jax.random.normal(jax.random.key(11), (1, 4, 8))
  v = jax.jit(m.init)(jax.random.key(0), x)

  def task_loss(params):
    y, _ = m.apply({**v, 'params': params}, x)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

  g = nn.meta.unbox(jax.jit(jax.grad(task_loss))(v['params']))
  assert float(jnp.linalg.norm(g['router'])) > 1e-3
  w_DE = nn.meta.unbox(v['params'])['router']
  plan = jax.jit(ROUTERS['top_k'].plan, static_argnums=(1, 2))(x @ w_DE, cfg, 4, None, None)
  assert np.all(np.asarray(plan.slot_index_GSK) >= 0)   # C = S: nothing dropped
  np.testing.assert_allclose(plan.combine_weight_GSK[..., 0], jnp.max(plan.probs_GSE, -1),
                             atol=1e-6)
  assert float(jnp.max(plan.combine_weight_GSK)) < 1.0


def test_groups_and_jitter():
  x = jax.random.normal(jax.random.key(6), (2, 8, 8))
  cfg = _cfg(router='top_k', num_experts=4, group_size=4, jitter=0.1)
  m = MoEFFN(cfg, d_model=8, d_ff=16, causal=True)
  v = _variables('top_k')   # grouping does not change the parameters
  apply = jax.jit(m.apply, static_argnames='train')
  y_eval, _ = apply(v, x)
  y_train, _ = apply(v, x, train=True, rngs={'jitter': jax.random.key(1)})
  assert y_train.shape == x.shape and not np.allclose(y_train, y_eval)
  with pytest.raises(ConfigError, match='group_size'):
    m_bad = MoEFFN(_cfg(router='top_k', group_size=5), d_model=8, d_ff=16, causal=True)
    jax.eval_shape(m_bad.init, jax.random.key(0), x)


def test_soft_moe_weights():
  logits = jax.random.normal(jax.random.key(7), (1, 5, 6))
  run = jnp.array([[True, True, False, True, True]])
  plan = soft_route(logits, 3, run)
  np.testing.assert_allclose(jnp.sum(plan.dispatch_GSP, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(jnp.sum(plan.combine_GSP, axis=2)[0], [1, 1, 0, 1, 1], atol=1e-6)
  assert float(jnp.abs(plan.dispatch_GSP[0, 2]).max()) == 0.0


def test_soft_moe_published_normalisation_known_answer():
  """moe.soft_normalize: l = a * <x/|x|, phi/|phi|> (Puigcerver et al. 2023, sec. 2.3; vmoe's
  SoftRouter), by hand: x = (3, 4) -> (0.6, 0.8), (0, -2) -> (0, -1); phi's columns (1, 0),
  (0, 2), (1, 1) -> (1, 0), (0, 1), (1, 1)/sqrt(2); a = 2."""
  x_GSD = jnp.array([[[3.0, 4.0], [0.0, -2.0]]])
  phi_DP = jnp.array([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
  r = 1 / np.sqrt(2)
  want = 2 * np.array([[[0.6, 0.8, 1.4 * r], [0.0, -1.0, -r]]])
  np.testing.assert_allclose(R.soft_logits(x_GSD, phi_DP, jnp.float32(2.0)), want, atol=1e-5)
  np.testing.assert_allclose(R.soft_logits(x_GSD, phi_DP), x_GSD @ phi_DP)  # the flag off
  # In the layer: a learned scalar (init 1) and logits blind to the input's norm -- the
  # routing of x and 10x is the same (z-loss reads the logits), where plain x Phi is not.
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  for normalize in (True, False):
    m = MoEFFN(_cfg(router='soft', num_experts=2, num_slots=2, soft_normalize=normalize),
               d_model=8, d_ff=16, causal=False)
    params = m.init(jax.random.key(1), x)['params']
    assert ('soft_scale' in params) == normalize
    z = [float(m.apply({'params': params}, v)[1]['z_loss']) for v in (x, 10 * x)]
    assert np.isclose(z[0], z[1], rtol=1e-5) == normalize, (normalize, z)
    if normalize:
      assert float(params['soft_scale']) == 1.0
      g = jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x)[0] ** 2))(params)
      assert abs(float(g['soft_scale'])) > 0
  with pytest.raises(ConfigError, match="moe.soft_normalize=True.*moe.router='soft'"):
    validate_moe(_cfg(router='top_k', soft_normalize=True), d_model=8, causal=False)


# ----------------------------------------------------------------------------- balancing

def test_bias_balancing_lowers_imbalance():
  e_, s = 8, 512
  skew_E = jnp.array([3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])

  @jax.jit
  def load_of(bias_E, key):
    logits = jax.random.normal(key, (1, s, e_)) + skew_E   # a router skewed to experts 0-2
    plan = top_k_route(logits, 2, s, bias_E=bias_E)
    return router_aux(plan, jnp.ones((1, s), bool), 'top_k', (1, s))['load']

  def imbalance(load):
    return float(jnp.max(load) / jnp.mean(load))

  bias = jnp.zeros((e_,))
  before = imbalance(load_of(bias, jax.random.key(0)))
  for i in range(300):
    bias = update_bias(bias, load_of(bias, jax.random.key(i)), 0.02)
  after = imbalance(load_of(bias, jax.random.key(999)))
  assert before > 3.0 and after < 1.5, (before, after)
  np.testing.assert_allclose(update_bias(jnp.zeros(3), jnp.array([1., 2., 6.]), 0.5),
                             [0.5, 0.5, -0.5])


def test_bias_variable_collection():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8))
  m = MoEFFN(_cfg(router='top_k', bias_rate=0.01, num_experts=4), d_model=8, d_ff=16,
             causal=True)
  v = {**_variables('top_k'), 'moe_state': {'bias': jnp.zeros((4,))}}
  assert jax.eval_shape(m.init, jax.random.key(0), x)['moe_state']['bias'].shape == (4,)
  # a large bias on expert 3 makes it everybody's first choice; combine still unbiased
  v2 = {**v, 'moe_state': {'bias': jnp.array([0., 0., 0., 100.])}}
  _, aux = jax.jit(m.apply)(v2, x)
  np.testing.assert_array_equal(aux['top1_expert'], 3)
  m_plain = MoEFFN(_cfg(router='top_k'), d_model=8, d_ff=16, causal=True)
  assert 'moe_state' not in jax.eval_shape(m_plain.init, jax.random.key(0), x)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize('overrides, causal, mesh_expert, field', [
    (dict(router='switch'), False, 1, 'moe.router'),
    (dict(top_k=9), False, 1, 'moe.top_k'),
    (dict(top_k=0), False, 1, 'moe.top_k'),
    (dict(capacity_factor=0.0), False, 1, 'moe.capacity_factor'),
    (dict(num_experts=0), False, 1, 'moe.num_experts'),
    (dict(router='expert_choice'), True, 1, 'leaks future tokens'),
    (dict(router='soft'), True, 1, 'encoder only'),
    (dict(num_experts=6), False, 4, 'mesh.expert'),
    (dict(num_experts=6), False, 4, 'moe.num_experts'),
    (dict(shared_experts=-1), False, 1, 'moe.shared_experts'),
    (dict(jitter=-0.1), False, 1, 'moe.jitter'),
    (dict(dispatch='scatter'), False, 1, 'moe.dispatch'),
    (dict(priority='random'), False, 1, 'moe.priority'),
    (dict(num_slots=0), False, 1, 'moe.num_slots'),
])
def test_validate_moe_rejects(overrides, causal, mesh_expert, field):
  cfg = _cfg(**{'router': 'top_k', 'num_experts': 8, 'top_k': 2, **overrides})
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    validate_moe(cfg, d_model=16, causal=causal, mesh_expert=mesh_expert)


def test_validate_moe_accepts_defaults_and_lists_routers():
  for router in ROUTERS:
    validate_moe(_cfg(router=router), d_model=16, causal=router not in ('soft',
                                                                       'expert_choice'))
  with pytest.raises(ConfigError) as e:
    validate_moe(_cfg(router='nope'), d_model=16, causal=False)
  assert all(r in str(e.value) for r in ROUTERS)
