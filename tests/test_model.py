"""Model core: causal masking, KV-cache decoding, scan == unrolled stack, shared weights."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax.errors import ConfigError
from act_jax.model import halting
from act_jax.model.transformer import Layer, head_logits, init_cache, make_model


def small_config(**model):
  c = config_lib.default_config()
  c.model.update(d_model=32, num_heads=4, d_ff=64, num_layers=3, **model)
  c.data.update(seq_len=16, batch_size=2)
  return c


def init(config, seed=0, L=16):
  model = make_model(config_lib.resolve(config))
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (2, L), 0, 256)
  variables = nn.unbox(model.init(jax.random.PRNGKey(seed), tokens))
  return model, variables, tokens


def test_causal_masking_future_tokens_never_change_the_past():
  config = small_config()
  model, variables, tokens = init(config)
  logits, _ = model.apply(variables, tokens)
  for t in (0, 5, 14):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % 256)
    logits2, _ = model.apply(variables, changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :t + 1]), np.asarray(logits2[:, :t + 1]))
    assert not np.allclose(logits[:, t + 1:], logits2[:, t + 1:])


def test_bidirectional_encoder_sees_the_future():
  config = small_config(causal=False)
  model, variables, tokens = init(config)
  logits, _ = model.apply(variables, tokens)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 7) % 256)
  logits2, _ = model.apply(variables, changed)
  assert not np.allclose(logits[:, 0], logits2[:, 0])


@pytest.mark.parametrize('share,inject', [(False, False), (True, False), (True, True)])
def test_kv_cache_decoding_equals_full_forward(share, inject):
  config = small_config(share_weights=share, inject_input=inject)
  model, variables, tokens = init(config)
  full, _ = model.apply(variables, tokens)
  cache = init_cache(config_lib.resolve(config), batch=2, max_len=16)
  # A 4-token prompt in one chunk, then one token at a time.
  out, aux = model.apply(variables, tokens[:, :4], cache=cache, cache_index=0)
  pieces, cache = [out], aux['cache']
  for t in range(4, 16):
    out, aux = model.apply(variables, tokens[:, t:t + 1], cache=cache, cache_index=t)
    pieces.append(out)
    cache = aux['cache']
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_scan_equals_explicitly_unrolled_stack():
  config = small_config()
  model, variables, tokens = init(config)
  logits, aux = model.apply(variables, tokens)
  p = variables['params']
  frozen = model.config
  h = jnp.take(p['embedding'], tokens, axis=0)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  running = jnp.ones((2, 16), bool)
  for i in range(config.model.num_layers):
    p_i = jax.tree.map(lambda x: x[i], p['stack']['layer_0'])
    h, _, _ = Layer(frozen, 'dense').apply({'params': p_i}, h, pos, running, tokens, None,
                                           None, None)
  head = {'norm_scale': p['final_norm_scale'],
          'unembed_DV': p['embedding'].T / jnp.sqrt(32.0)}
  np.testing.assert_allclose(logits, head_logits(head, h), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(aux['layers'], np.full((2, 16), 3.0))


def test_looped_transformer_reinjects_the_embedding_every_step():
  # Fan et al. 2024: h_in^n = h^{n-1} + e, h^0 = 0, one shared block (step 1 reads e).
  config = small_config(share_weights=True, inject_input=True, causal=False)
  model, variables, tokens = init(config)
  logits, _ = model.apply(variables, tokens)
  p = variables['params']
  e = jnp.take(p['embedding'], tokens, axis=0)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  running = jnp.ones((2, 16), bool)
  h = jnp.zeros_like(e)
  for _ in range(config.model.num_layers):
    h, _, _ = Layer(model.config, 'dense').apply({'params': p['stack']['layer_0']}, h + e,
                                                 pos, running, tokens, None, None, None)
  head = {'norm_scale': p['final_norm_scale'],
          'unembed_DV': p['embedding'].T / jnp.sqrt(32.0)}
  np.testing.assert_allclose(logits, head_logits(head, h), atol=1e-5, rtol=1e-5)
  # the same parameters without re-injection: step 1 is identical, later steps are not
  plain = make_model(config_lib.resolve(small_config(share_weights=True, causal=False)))
  assert not np.allclose(plain.apply(variables, tokens)[0], logits, atol=1e-3)
  one = small_config(share_weights=True, causal=False)
  one_inj = small_config(share_weights=True, causal=False, inject_input=True)
  one.model.num_layers = one_inj.model.num_layers = 1
  np.testing.assert_allclose(make_model(config_lib.resolve(one)).apply(variables, tokens)[0],
                             make_model(config_lib.resolve(one_inj)).apply(variables, tokens)[0],
                             atol=1e-6)


def test_inject_input_needs_one_shared_block():
  with pytest.raises(ConfigError, match='model.inject_input'):
    config_lib.resolve(small_config(inject_input=True))


def test_shared_weights_have_one_block_of_parameters():
  unshared = init(small_config())[1]['params']
  shared = init(small_config(share_weights=True))[1]['params']
  n = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert n(unshared['stack']) == 3 * n(shared['stack'])
  assert shared['stack']['layer_0']['mlp']['w_in'].shape == (32, 64)  # no layer axis
  assert unshared['stack']['layer_0']['mlp']['w_in'].shape == (3, 32, 64)


def test_every_parameter_has_logical_axis_names():
  config = small_config()
  model = make_model(config_lib.resolve(config))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
  leaves = jax.tree.leaves(boxed['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  stacked = boxed['params']['stack']['layer_0']['mlp']['w_in']
  assert stacked.names == ('layers', 'embed', 'mlp')


def test_untied_head_and_bf16_compute_run():
  config = small_config(tie_embeddings=False, dtype='bfloat16', remat='full')
  model, variables, tokens = init(config)
  assert variables['params']['embedding'].dtype == jnp.float32  # params stay f32
  assert 'unembed' in variables['params']
  grads = jax.grad(lambda p: model.apply({'params': p}, tokens)[0].mean())(variables['params'])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_layer_dropout_rises_with_depth_and_only_in_training():
  """LayerSkip's rate p * (2^(i/(N-1)) - 1): 0 at the first step, p at the last. At
  p = 0.999 the last step is skipped for every row (its exit logits equal the step before),
  the first step never; evaluation never drops."""
  config = small_config(layer_dropout=0.999)
  config.halting.update(name='confidence')
  model, variables, tokens = init(config)
  rngs = {'halting': jax.random.PRNGKey(3), 'jitter': jax.random.PRNGKey(3)}
  _, aux = make_model(config_lib.resolve(config), train=True).apply(variables, tokens, rngs=rngs)
  s = np.asarray(halting.step_logits(aux))                  # [N, B, L, V]
  np.testing.assert_array_equal(s[2], s[1])                 # last step dropped (w.p. 0.999^2)
  _, ref = make_model(config_lib.resolve(config), train=False).apply(variables, tokens)
  r = np.asarray(ref['step_logits'])
  np.testing.assert_allclose(s[0], r[0], atol=1e-5)          # first step never dropped
  assert np.abs(r[2] - r[1]).max() > 1e-3                    # eval runs every step
  with pytest.raises(config_lib.ConfigError, match='model.layer_dropout=1.0'):
    config_lib.resolve(small_config(layer_dropout=1.0))
