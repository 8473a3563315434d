"""Exit losses without [N,B,L,V] (act_jax/model/layers/head.py): the training forward returns
the exits' states, the losses compute each exit's logits one token tile at a time. Against
the stacked-logits path (today's maths, every step's logits materialised), for every policy
that reads the exits and every option: equal losses and gradients (1e-5, f32), padding
included, with 1 and with 3 length tiles (3 does not divide the length: the padded tile),
from the exits' states and from the statistics the depth scan computes given the targets;
with 3 tiles the final head is tiled too. And no [N,B,L,V] array anywhere in the training
step's program."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax import data as data_lib
from act_jax.data import PAD
from act_jax.model import halting
from act_jax.model.layers.head import token_stats
from act_jax.model.transformer import make_model
from act_jax.train import training
from experiments.configs import lm

@pytest.fixture(autouse=True, scope='module')
def _compiled_here_not_cached():
  """Three times in the whole default tier (never with this file alone) a worker segfaulted
  in this file while it ran its losses op by op (eager: thousands of small compiles) -- in
  get_executable_and_time, executable.serialize and backend_compile_and_load (jax 0.10.2,
  XLA:CPU). The tests now jit each path (one compile), and their programs stay out of the
  shared cache."""
  old = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1e9)
  yield
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old)


VARIANTS = {  # name -> config overrides on lm.py:runlocal (confidence exits + top-2 MoE)
    'act (no exits: the final head tiled)': {'halting.name': 'act', 'halting.exit_aware': 0.0,
                                            'halting.distill': 0.0},
    'confidence+exit_aware+distill': {},
    'confidence': {'halting.exit_aware': 0.0, 'halting.distill': 0.0},
    'learned_exit': {'halting.name': 'learned_exit'},
    'pondernet': {'halting.name': 'pondernet', 'halting.exit_aware': 0.0,
                  'halting.distill': 0.0},
    'confidence+layer_dropout+uniform': {'model.layer_dropout': 0.3,
                                         'halting.exit_weights': 'uniform'},
}


def _setup(overrides: dict, tiles: int = 1):
  config = lm.get_config('runlocal')
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  config.model.loss_tiles = tiles
  spec = config_lib.resolve(config, device_count=1)
  batch = dict(data_lib.make_dataset(spec.data, 0).train_batch(0))
  inputs = np.asarray(batch['inputs']).copy()
  weights = np.asarray(batch['weights'], np.float32).copy()
  inputs[0, -5:] = PAD  # padding: never runs, weight 0
  weights[0, -5:] = 0.0
  weights[1, :3] = 0.0  # and masked targets on real tokens
  batch.update(inputs=jnp.asarray(inputs), weights=jnp.asarray(weights))
  model = make_model(spec, train=True)
  rngs = {'params': jax.random.PRNGKey(0), 'halting': jax.random.PRNGKey(1),
          'jitter': jax.random.PRNGKey(2)}
  variables = jax.jit(model.init)(rngs, batch['inputs'])
  return spec, model, variables, batch


def _loss(spec, model, variables, batch, stacked: bool, targets: bool = False):
  """The training loss; stacked: from materialised [N,B,L,V] logits (today's maths);
  targets: the model gets the targets and computes each exit's statistics in its scan."""
  def f(params):
    logits, aux = model.apply({'params': params, 'moe_state': variables.get('moe_state', {})},
                              batch['inputs'], rngs={'halting': jax.random.PRNGKey(1),
                                                     'jitter': jax.random.PRNGKey(2)},
                              targets_BL=batch['targets'] if targets else None)
    if stacked and 'step_h' in aux:  # today's path: every step's logits, materialised
      aux = dict(aux, step_logits=halting.step_logits(aux))
      del aux['step_h']
    return training.total_loss(spec, logits, aux, batch)
  return f


# slow (~30 s each): plain confidence and learned_exit (their exit paths run in the
# exit_aware+distill and pondernet variants and in the training-step test below), and
# layer dropout with uniform weights
SLOW_VARIANTS = ('confidence', 'confidence+layer_dropout+uniform', 'learned_exit')


@pytest.mark.parametrize('variant', [
    pytest.param(v, marks=pytest.mark.slow) if v in SLOW_VARIANTS else v
    for v in sorted(VARIANTS)])
def test_tiled_exit_losses_equal_the_stacked_logits_path(variant):
  spec, model, variables, batch = _setup(VARIANTS[variant])
  ref_fn = _loss(spec, model, variables, batch, stacked=True)
  # jitted: one program per path (eager, every primitive is its own compile)
  (ref, ref_terms), ref_g = jax.jit(jax.value_and_grad(ref_fn, has_aux=True))(
      variables['params'])
  assert float(ref) > 0
  for tiles, targets in ((1, False), (3, False), (1, True), (3, True)):
    spec_t, model_t, _, _ = _setup(VARIANTS[variant], tiles)
    fn = _loss(spec_t, model_t, variables, batch, stacked=False, targets=targets)
    (got, terms), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(variables['params'])
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5, atol=1e-6)
    for k in ref_terms:
      np.testing.assert_allclose(float(terms[k]), float(ref_terms[k]), rtol=1e-5, atol=1e-6,
                                 err_msg=f'{variant} tiles={tiles} {k}')
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                 err_msg=f'{variant} tiles={tiles} {jax.tree_util.keystr(path)}')


def test_token_stats_known_answer():
  """CE, argmax and the distillation KL of a head on hand-made states, any tiling."""
  rng = np.random.default_rng(0)
  d, v = 4, 7
  head = {'norm_scale': jnp.ones((d,)), 'unembed_DV': jnp.asarray(rng.normal(size=(d, v)),
                                                                   jnp.float32)}
  h = jnp.asarray(rng.normal(size=(2, 3, 5, d)), jnp.float32)  # X=2 exits, B=3, L=5
  tgt = jnp.asarray(rng.integers(0, v, (3, 5)), jnp.int32)
  x = np.asarray(h, np.float64)
  x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
  z = x @ np.asarray(head['unembed_DV'], np.float64)                   # [X,B,L,V]
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, np.asarray(tgt)[None, ..., None], -1)[..., 0]
  kl = (np.exp(logp[-1]) * (logp[-1] - logp)).sum(-1)                  # ref = the last exit
  for tiles in (1, 2, 4, 15, 100):
    s = token_stats(head, h, tgt, tiles, ref_BLD=h[-1], argmax=True)
    np.testing.assert_allclose(s['ce'], ce, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s['kl'], kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(s['argmax'], z.argmax(-1))


def _shapes(jaxpr) -> list[tuple[int, ...]]:
  """Every array shape a jaxpr (and the jaxprs inside it: scans, remat, ...) produces."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, 'shape')]
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          out += _shapes(inner)
  return out


@pytest.mark.parametrize('variant', ['confidence+exit_aware+distill', 'pondernet',
                                     'learned_exit'])
def test_the_training_step_never_builds_every_exits_logits(variant):
  """The loss and its gradient, traced: no array of N x B x L x V (or more) elements with a
  vocabulary axis, where the stacked path has [N,B,L,V] (and its gradient)."""
  spec, model, variables, batch = _setup(VARIANTS[variant], tiles=4)
  n, (b, l), v = spec.model.num_steps, batch['inputs'].shape, spec.model.vocab_size
  grad = jax.grad(lambda p: _loss(spec, model, variables, batch, stacked=False)(p)[0])
  shapes = _shapes(jax.make_jaxpr(grad)(variables['params']).jaxpr)
  big = [s for s in shapes if s and s[-1] == v and int(np.prod(s)) >= n * b * l * v]
  assert not big, big
  stacked = jax.grad(lambda p: _loss(spec, model, variables, batch, stacked=True)(p)[0])
  shapes = _shapes(jax.make_jaxpr(stacked)(variables['params']).jaxpr)
  assert any(s[-1:] == (v,) and int(np.prod(s)) >= n * b * l * v for s in shapes if s)
