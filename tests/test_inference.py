"""Inference that really skips layers: while-loop == masked scan, CALM KV propagation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax.infer import inference
from act_jax.errors import CheckpointError, ConfigError
from act_jax.model.layers import Attention, rms_norm
from act_jax.model.transformer import Layer, init_cache, make_model
from act_jax.run import directory as run_lib

POLICIES = ['none', 'act', 'pondernet', 'confidence', 'learned_exit', 'mod']


def setup(policy='confidence', layers=4, causal=True, bias_init=-1.0, **halting):
  c = config_lib.default_config()
  c.model.update(d_model=32, num_heads=4, d_ff=64, num_layers=layers, causal=causal)
  c.data.update(seq_len=24, batch_size=2)
  c.halting.update(name=policy, bias_init=bias_init, **halting)
  model = make_model(config_lib.resolve(c))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 0, 256)
  v = nn.unbox(model.init(jax.random.PRNGKey(0), tokens))
  return c, model, {'params': v['params'], 'moe_state': v.get('moe_state', {})}, tokens


THRESHOLDS = {'act': [0.3, 0.99], 'pondernet': [0.3, 0.9], 'confidence': [0.02, 0.1],
              'learned_exit': [0.4, 0.6], 'none': [0.5], 'mod': [0.5]}


@pytest.mark.parametrize('policy', POLICIES)
def test_while_loop_equals_masked_scan(policy):
  c, model, v, tokens = setup(policy)
  fwd = jax.jit(lambda v, t, th: inference.forward_while(c, v, t, th))
  cmp = jax.jit(lambda v, t, th: inference.forward_compact(c, v, t, th))
  for thr in THRESHOLDS[policy]:
    ref, ra = model.apply(v, tokens, threshold=thr)
    got, ga = fwd(v, tokens, thr)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(ga['layers'], ra['layers'])
    np.testing.assert_array_equal(ga['exit_step'], ra['exit_step'])
    got2, ca = cmp(v, tokens, thr)
    np.testing.assert_allclose(got2, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(ca['layers'], ra['layers'])


def test_exits_really_happen_at_low_thresholds():
  c, model, v, tokens = setup('confidence')
  _, lo = inference.forward_while(c, v, tokens, 0.01)
  _, hi = inference.forward_while(c, v, tokens, 1.0)
  assert float(lo['layers'].mean()) == 1.0 and float(hi['layers'].mean()) == 4.0


def _full_depth_decode(c, model, v, prompt, n):
  """Reference: the masked-scan model fed one token at a time with a KV cache."""
  b, p = prompt.shape
  cache = init_cache(config_lib.resolve(c), b, p + n)
  lg, aux = model.apply(v, prompt, threshold=inference.NEVER_EXIT, cache=cache, cache_index=0)
  toks, tok, cache = [], jnp.argmax(lg[:, -1], -1), aux['cache']
  for t in range(n - 1):
    toks.append(tok)
    lg, aux = model.apply(v, tok[:, None], threshold=inference.NEVER_EXIT, cache=cache,
                          cache_index=p + t)
    tok, cache = jnp.argmax(lg[:, -1], -1), aux['cache']
  toks.append(tok)
  return np.stack(toks, 1)


def test_never_exit_decoding_equals_full_depth_decoding():
  c, model, v, tokens = setup('confidence')
  out = inference.generate(c, v, tokens[:, :4], 10, 1.0)
  np.testing.assert_array_equal(out['tokens'], _full_depth_decode(c, model, v, tokens[:, :4], 10))
  assert np.all(np.asarray(out['layers']) == 4)


def test_early_exit_decoding_equals_masked_scan_decoding():
  """With exits, the while-loop decoder and the masked scan agree token for token."""
  c, model, v, tokens = setup('confidence')
  thr = 0.03
  out = inference.generate(c, v, tokens[:, :4], 8, thr)
  b, p = 4, 4
  cache = init_cache(config_lib.resolve(c), b, p + 8)
  lg, aux = model.apply(v, tokens[:, :4], threshold=thr, cache=cache, cache_index=0)
  tok, cache, toks, layers = jnp.argmax(lg[:, -1], -1), aux['cache'], [], []
  for t in range(7):
    toks.append(tok)
    lg, aux = model.apply(v, tok[:, None], threshold=thr, cache=cache, cache_index=p + t)
    layers.append(aux['layers'][:, 0])
    tok, cache = jnp.argmax(lg[:, -1], -1), aux['cache']
  toks.append(tok)
  np.testing.assert_array_equal(out['tokens'], np.stack(toks, 1))
  np.testing.assert_array_equal(out['layers'], np.stack(layers, 1))
  assert 1.0 <= float(np.mean(out['layers'])) < 4.0  # some tokens really exited
  # Not waiting for the slowest row (compacted buckets) changes nothing but the cost.
  comp = inference.generate(c, v, tokens[:, :4], 8, thr, compact=True)
  np.testing.assert_array_equal(comp['tokens'], out['tokens'])
  np.testing.assert_array_equal(comp['layers'], out['layers'])


@pytest.mark.parametrize('per_row_index', [False, True])
def test_compacted_decode_step_writes_the_same_cache(per_row_index):
  """A row gathered out of the bucket after it exited runs no later step, so those steps'
  K/V at this position are never written by the loop: the fill must write them (from the
  exit state, as the frozen row in the full batch writes them). At threshold 0.28 row 0
  exits after step 0 and row 1 runs all 4 steps (the middle of the range 0.26-0.30 where
  they split), so rows are gathered after step 0."""
  c, model, v, tokens = setup('confidence')
  cache = init_cache(config_lib.resolve(c), 2, 16)
  _, aux = model.apply(v, tokens[:2, :4], threshold=1.0, cache=cache, cache_index=0)
  index = jnp.full((2,), 4, jnp.int32) if per_row_index else jnp.int32(4)
  step = jax.jit(lambda cache, compact: inference.decode_step(
      c, v, cache, tokens[:2, 4:5], index, 0.28, compact=compact), static_argnums=1)
  lg, a = step(aux['cache'], False)
  lg_c, a_c = step(aux['cache'], True)
  np.testing.assert_array_equal(np.asarray(a['exit_step'])[:, -1], [0, 3])
  np.testing.assert_array_equal(np.asarray(a_c['exit_step']), np.asarray(a['exit_step']))
  np.testing.assert_allclose(np.asarray(lg_c), np.asarray(lg), rtol=1e-6, atol=1e-6)
  for g, (full, comp) in enumerate(zip(a['cache'], a_c['cache'])):
    for name in ('k', 'v'):
      np.testing.assert_allclose(np.asarray(comp[name]), np.asarray(full[name]), rtol=1e-6,
                                 atol=1e-6, err_msg=f'layer {g} {name}')


def _exit_state_and_cache(kv_fill):
  c, model, v, tokens = setup('confidence')
  cache = init_cache(config_lib.resolve(c), 2, 8)
  tok = tokens[:2, :1]
  # threshold tiny: every token exits after step 0, layers 1..3 are filled, not computed.
  _, aux = inference.decode_step(c, v, cache, tok, jnp.int32(0), jnp.float32(1e-6), kv_fill)
  assert np.all(np.asarray(aux['exit_step']) == 0)
  p0 = jax.tree.map(lambda x: x[0], v['params']['stack']['layer_0'])
  emb = jnp.take(v['params']['embedding'], tok, axis=0)
  pos = jnp.zeros((2, 1), jnp.int32)
  h_exit, _, _ = Layer(make_model(config_lib.resolve(c)).config, 'dense').apply(
      {'params': p0}, emb, pos, jnp.ones((2, 1), bool), tok, None, init_cache(config_lib.resolve(c), 2, 8)[0]
      and {'k': jnp.zeros((2, 8, 4, 8)), 'v': jnp.zeros((2, 8, 4, 8))}, jnp.int32(0))
  return c, v, aux['cache'], h_exit, emb, pos


def _project(c, v, j, h, pos):
  pj = jax.tree.map(lambda x: x[j], v['params']['stack']['layer_0'])
  attn = Attention(4, 8, 32, causal=True)
  return attn.apply({'params': pj['attn']}, rms_norm(h, pj['attn_norm']['scale']), pos,
                    method=Attention.kv)


def test_kv_of_skipped_layers_is_the_projection_of_the_exit_state():
  c, v, cache, h_exit, emb, pos = _exit_state_and_cache('project')
  for j in (1, 2, 3):
    k, val = _project(c, v, j, h_exit, pos)
    np.testing.assert_allclose(cache[0]['k'][j, :, :1], k, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cache[0]['v'][j, :, :1], val, atol=1e-5, rtol=1e-5)
    # Propagating the first segment's state (the embedding) — the t5x bug — differs.
    k_wrong, _ = _project(c, v, j, emb, pos)
    assert not np.allclose(cache[0]['k'][j, :, :1], k_wrong, atol=1e-3)


def test_kv_copy_mode_copies_the_exit_layer():
  c, v, cache, *_ = _exit_state_and_cache('copy')
  for j in (1, 2, 3):
    np.testing.assert_array_equal(cache[0]['k'][j, :, :1], cache[0]['k'][0, :, :1])
    np.testing.assert_array_equal(cache[0]['v'][j, :, :1], cache[0]['v'][0, :, :1])


def test_changing_the_threshold_does_not_recompile():
  c, model, v, tokens = setup('confidence')
  traces = []

  @jax.jit
  def fwd(v, t, thr):
    traces.append(1)
    return inference.forward_while(c, v, t, thr)[1]['layers']

  means = [float(fwd(v, tokens, thr).mean()) for thr in (0.01, 0.05, 0.5, 1.0)]
  assert len(traces) == 1
  assert means[0] < means[-1]  # the operating point really moved
  inference.generate(c, v, tokens[:, :4], 4, 0.5)
  n = inference._generate._cache_size()
  inference.generate(c, v, tokens[:, :4], 4, 0.1)
  assert inference._generate._cache_size() == n


def test_bad_inputs():
  c, model, v, tokens = setup('confidence')
  with pytest.raises(ConfigError, match='max length'):
    inference.generate(c, v, tokens[:, :12], 20, 0.5)
  with pytest.raises(ConfigError, match='kv_fill'):
    inference.generate(c, v, tokens[:, :4], 4, 0.5, kv_fill='guess')
  with pytest.raises(ConfigError, match='threshold'):
    inference.check_threshold(1.5)
  with pytest.raises(CheckpointError, match='does not exist'):
    run_lib.load('/nonexistent/run')


@pytest.mark.parametrize('policy', ['confidence', 'learned_exit'])
def test_max_layers_cap(policy):
  """A cap after layer 2 of 4: exits before it are unchanged (steps 0-1 see the same context),
  every other token leaves at step 1 with its step-1 exit logits; the while loop == the scan
  and never runs step 2."""
  c, model, v, tokens = setup(policy)
  key = {'confidence': 'confidence', 'learned_exit': 'exit_prob'}[policy]
  s = np.asarray(model.apply(v, tokens, threshold=inference.NEVER_EXIT)[1][key])
  thr = float(np.quantile(s[:2], 0.7))  # some tokens exit by step 1, others later
  vec = inference.exit_threshold(c, thr, max_layers=2)
  np.testing.assert_array_equal(vec, np.float32([thr, -np.inf, thr, thr]))
  ref, ra = model.apply(v, tokens, threshold=thr)
  got, ga = model.apply(v, tokens, threshold=vec)
  e_ref, e_got = np.asarray(ra['exit_step']), np.asarray(ga['exit_step'])
  assert (e_ref > 1).any() and (e_ref <= 1).any()  # both kinds of token are present
  np.testing.assert_array_equal(e_got, np.minimum(e_ref, 1))
  assert int(ga['layers'].max()) == 2
  early = e_ref <= 1
  np.testing.assert_allclose(np.asarray(got)[early], np.asarray(ref)[early], atol=1e-5)
  np.testing.assert_allclose(np.asarray(got)[~early],
                             np.asarray(ra['step_logits'][1])[~early], atol=1e-5)
  wl, wa = jax.jit(lambda v, t, th: inference.forward_while(c, v, t, th))(v, tokens, vec)
  np.testing.assert_allclose(wl, got, atol=1e-5)
  np.testing.assert_array_equal(wa['exit_step'], e_got)
  assert int(np.asarray(wa['running'])[2:].sum()) == 0  # steps past the cap never ran
  out = inference.generate(c, v, tokens[:, :4], 6, vec)
  assert int(np.asarray(out['layers']).max()) <= 2
  # a scalar and the uncapped vector are the same operating point
  same = model.apply(v, tokens, threshold=jnp.full((4,), thr))[0]
  np.testing.assert_allclose(same, ref, atol=1e-6)


def test_caps_do_not_recompile_and_bad_caps_are_refused():
  c, model, v, tokens = setup('confidence')
  traces = []

  @jax.jit
  def fwd(v, t, thr):
    traces.append(1)
    return inference.forward_while(c, v, t, thr)[1]['layers']

  maxes = [int(fwd(v, tokens, inference.exit_threshold(c, 1.0, k)).max()) for k in (1, 2, 3)]
  assert maxes == [1, 2, 3] and len(traces) == 1
  # one encoded form for every operating point: a per-step vector [N]
  np.testing.assert_array_equal(inference.exit_threshold(c, 0.5, None), [0.5] * 4)
  np.testing.assert_array_equal(inference.exit_threshold(c, 0.5, 4), [0.5] * 4)  # no cap
  np.testing.assert_array_equal(inference.exit_threshold(c, 0.5, 2), [0.5, -np.inf, 0.5, 0.5])
  for bad in (0, 5, 2.5, True):
    with pytest.raises(ConfigError, match='max_layers'):
      inference.exit_threshold(c, 0.5, bad)
  c2, *_ = setup('confidence', exit_every=2)
  with pytest.raises(ConfigError, match=r'one of \[2, 4\]'):
    inference.exit_threshold(c2, 0.5, 1)
  c3, *_ = setup('act')
  with pytest.raises(ConfigError, match='early-exit policy'):
    inference.exit_threshold(c3, 0.5, 2)
