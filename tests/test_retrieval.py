"""Retrieval arm (act_jax/retrieval) and generalist fallback (act_jax/model/moe/fallback.py).

Reads the suite's shared trained runs 'lm' and 'lm_shared_expert' (tests/conftest.py)."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax.viz import listing
from act_jax import config as config_lib
from act_jax.retrieval import fallback_run
from act_jax.infer import inference
from act_jax.errors import CheckpointError, ConfigError
from act_jax.model.layers import GatedMLP
from act_jax.model.transformer import make_model
from act_jax.model.moe import MoEFFN
from act_jax.model.retrieval import arm, gate, knn
from act_jax.retrieval import datastore
from act_jax.data import corpus
from act_jax.spec import OperatingPoint
from act_jax.run import directory as run_lib
from experiments.configs import lm


# ----------------------------------------------------------------------------- search
KEYS = np.array([[0, 0], [1, 0], [0, 2], [3, 3]], np.float32)


@pytest.mark.parametrize('block', [8192, 2, 3])
def test_exact_search_known_answer(block):
  # |q - k|^2 for q = (0.9, 0.1): 0.82, 0.02, 4.42, 12.82
  d, i = knn.search(jnp.asarray([[0.9, 0.1]]), jnp.asarray(KEYS), 3, block=block)
  np.testing.assert_array_equal(np.asarray(i), [[1, 0, 2]])
  np.testing.assert_allclose(np.asarray(d), [[0.02, 0.82, 4.42]], atol=1e-5)
  # an invalid entry is never a neighbour; fewer valid entries than asked: inf / -1
  d, i = knn.search(jnp.asarray([[0.9, 0.1]]), jnp.asarray(KEYS), 4, block=block,
                    valid_I=jnp.asarray([True, False, True, False]))
  np.testing.assert_array_equal(np.asarray(i), [[0, 2, -1, -1]])
  assert np.isinf(np.asarray(d)[0, 2:]).all()
  vals = knn.lookup(jnp.asarray([10, 11, 12, 13]), i)
  np.testing.assert_array_equal(np.asarray(vals), [[10, 12, -1, -1]])


def test_approx_search_recall():
  """approx_max_k per block: recall >= 0.95 of the exact top-16 on random keys (its
  recall_target; XLA:CPU lowers it to an exact sort, TPUs to the partial reduction)."""
  rng = np.random.default_rng(0)
  keys = jnp.asarray(rng.normal(size=(4096, 32)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  _, exact = knn.search(q, keys, 16, block=1024)
  _, approx = knn.search(q, keys, 16, approx=True, recall_target=0.95, block=1024)
  hits = [len(set(a) & set(e)) for a, e in zip(np.asarray(approx), np.asarray(exact))]
  assert np.sum(hits) / exact.size >= 0.95


def test_sharded_search_matches_one_device(multidevice):
  out = multidevice('''
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from act_jax.model.retrieval import knn
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(1000, 16)).astype(np.float32)
    vals = rng.integers(0, 260, 1000).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)
    mesh = Mesh(np.asarray(jax.devices()[:4]), ('data',))
    k_s = jax.device_put(keys, NamedSharding(mesh, P('data')))
    v_s = jax.device_put(vals, NamedSharding(mesh, P('data')))
    d, i, v = jax.jit(lambda q, k, v: knn.sharded_search(q, k, v, 8, mesh, block=64))(q, k_s, v_s)
    d1, i1 = knn.search(q, jnp.asarray(keys), 8)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(i1))
    np.testing.assert_allclose(np.asarray(d), np.asarray(d1), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(v), vals[np.asarray(i1)])
    print('shards', len(k_s.addressable_shards))
  ''')
  assert 'shards 4' in out


def test_knn_distribution_and_interpolation_known_answer():
  d = jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  v = jnp.asarray([[5, 7, 5], [-1, -1, -1]])          # row 1: no neighbour found
  p = np.asarray(knn.knn_probs(d, v, 8, 1.0))
  z = np.exp(-1) + np.exp(-2) + np.exp(-3)
  want = np.zeros(8)
  want[5], want[7] = (np.exp(-1) + np.exp(-3)) / z, np.exp(-2) / z
  np.testing.assert_allclose(p[0], want, rtol=1e-6)
  np.testing.assert_array_equal(p[1], 0.0)
  lm_logits = jnp.zeros((2, 8))                        # p_LM uniform 1/8
  mixed = np.exp(np.asarray(knn.interpolate(lm_logits, jnp.asarray(p), 0.25)))
  np.testing.assert_allclose(mixed[0], 0.25 * want + 0.75 / 8, rtol=1e-6)
  np.testing.assert_allclose(mixed[1], 1 / 8, rtol=1e-6)  # no neighbour: p_LM unchanged


def test_gate_fit_and_threshold_known_answer():
  rng = np.random.default_rng(0)
  f = rng.uniform(size=(2000, 6)).astype(np.float32)
  y = (f[:, 0] < 0.4).astype(np.float32)            # low top-1 probability: retrieval helps
  g = gate.fit(f, y)
  p = np.asarray(gate.prob({k: jnp.asarray(v) for k, v in g.items()},
                           jnp.asarray([[0.1] + [.5] * 5, [0.9] + [.5] * 5], jnp.float32)))
  assert p[0] > 0.9 and p[1] < 0.1
  # the features by hand: p = softmax([log 3, 0, 0, 0]) = [.5, 1/6, 1/6, 1/6]
  f = np.asarray(gate.features(jnp.log(jnp.asarray([[3.0, 1, 1, 1]])), jnp.asarray([[2.0, 0]]),
                               1, 3))
  h = -(0.5 * np.log(0.5) + 3 / 6 * np.log(1 / 6)) / np.log(4)
  np.testing.assert_allclose(f, [[0.5, h, 0.5 - 1 / 6, 0.5, 2 / np.sqrt(2), 0]], rtol=1e-6)
  # gains: always retrieving gains 2 of 4; gating at t keeps tokens with p_gate >= t
  lm_ok, knn_ok = np.array([0, 0, 1, 1]), np.array([1, 1, 1, 1])
  assert gate.choose_threshold(np.array([.9, .6, .2, .1]), lm_ok, knn_ok, keep=1.0,
                               grid=[.1, .5, .6, .7]) == 0.6
  assert gate.choose_threshold(np.array([.9, .6, .2, .1]), lm_ok, knn_ok, keep=0.5,
                               grid=[.1, .5, .6, .7]) == 0.7
  assert gate.choose_threshold(np.ones(4), knn_ok, lm_ok) == gate.NEVER  # no gain: never


# ----------------------------------------------------------------------------- datastore
CORPUS = {f'm{i}.py': ''.join(f'def f{i}_{j}(x):\n  return x * {j} + {i}\n\n'
                                for j in range(12 + i)) for i in range(12)}


@pytest.fixture(scope='module')
def base(shared_runs, tmp_path_factory):
  """The shared tiny trained run 'lm' (confidence exits + top-k MoE; read only) and a small
  corpus of files."""
  path = shared_runs.path('lm')
  files = tmp_path_factory.mktemp('files')
  for name, text in CORPUS.items():
    (files / name).write_text(text)
  return path, str(files / '*.py')


def _arrays(path):
  return {n: np.asarray(datastore.ts.open({'driver': 'zarr', 'kvstore': {
      'driver': 'file', 'path': os.path.join(path, n)}}, open=True).result().read().result())
          for n in ('keys', 'values')}


def test_tuning_share_is_never_empty_when_asked_for(tmp_path):
  """The tuning documents are picked by a hash of each name (its full path): on a few files
  the hash can pick none -- and the gate would go untrained -- wherever the files sit. With
  tune_fraction > 0 and >= 2 train documents, both shares are non-empty, every document in
  exactly one of train-stored, tuning or held out."""
  for i in range(6):
    (tmp_path / f'd{i}.py').write_text(f'x = {i}\n' * 50)
  data = lm.get_config('runlocal').data
  data.update(heldout_fraction=0.2, max_bytes=10**6)
  for frac, tuned in ((1e-3, 1), (0.999, None)):
    store, tune = datastore.documents(str(tmp_path / '*.py'), data, frac, 10**6)
    assert store and tune, (frac, len(store), len(tune))
    assert tuned is None or len(tune) == tuned
    assert len({n for n, _ in store} | {n for n, _ in tune}) == len(store) + len(tune) < 6
  store, tune = datastore.documents(str(tmp_path / '*.py'), data, 0.0, 10**6)
  # no tuning asked for: none taken, and every train document stored (the held-out share is
  # a hash of the temporary paths, so its size is the split's, not a fixed number)
  train, _ = corpus.split_docs(corpus.file_documents(str(tmp_path / '*.py'), data.max_bytes)
                               ['code'], data.heldout_fraction)
  assert not tune and sorted(n for n, _ in store) == sorted(n for n, _ in train)


def test_datastore_killed_rebuilt_identical_and_refusals(base, tmp_path):
  run, files = base
  kw = dict(max_bytes=3000, chunk_windows=8, tune_fraction=0.2, tune_windows=16,
            log=lambda s: None)
  clean = datastore.build(run, files, str(tmp_path / 'a'), **kw)
  assert clean['complete'] and clean['entries'] > 8 * 32  # several chunks
  part = datastore.build(run, files, str(tmp_path / 'b'), stop_after=1, **kw)
  assert not part['complete']
  with pytest.raises(CheckpointError, match='unfinished build'):
    datastore.load(str(tmp_path / 'b'), run_lib.read_config(run))
  with open(tmp_path / 'b' / 'progress.json') as f:
    assert len(json.load(f)['done']) == 1
  lines = []
  again = datastore.build(run, files, str(tmp_path / 'b'), **dict(kw, log=lines.append))
  assert '1/' in lines[0] and again['tuned'] == clean['tuned']
  a, b = _arrays(str(tmp_path / 'a')), _arrays(str(tmp_path / 'b'))
  np.testing.assert_array_equal(a['keys'], b['keys'])
  np.testing.assert_array_equal(a['values'], b['values'])
  # values are the next bytes of the stored documents, in order (BOS doc EOS per document)
  spec, state, _ = run_lib.load(run)
  store, _ = datastore.documents(files, spec.data, 0.2, 3000)
  first = np.frombuffer(store[0][1], np.uint8)[:10]
  np.testing.assert_array_equal(a['values'][:10], first)
  # a finished datastore is never deleted by a build with other arguments
  with pytest.raises(ConfigError, match='holds a complete datastore'):
    datastore.build(run, files, str(tmp_path / 'a'), **dict(kw, max_bytes=2000))
  assert os.path.exists(tmp_path / 'a' / 'datastore.json')
  # another model: key dimension, then same shapes but other weights
  other = dataclasses.replace(spec, model=dataclasses.replace(spec.model, d_model=48))
  with pytest.raises(ConfigError, match='dimension 32.*d_model=48'):
    datastore.load(str(tmp_path / 'a'), other)
  params = dict(state['params'], final_norm_scale=state['params']['final_norm_scale'] + 1)
  with pytest.raises(ConfigError, match='built from another model'):
    datastore.load(str(tmp_path / 'a'), spec, params=params)


@pytest.fixture(scope='module')
def store(base, tmp_path_factory):
  run, files = base
  out = str(tmp_path_factory.mktemp('ds') / 'ds')
  datastore.build(run, files, out, max_bytes=3000, tune_fraction=0.2, tune_windows=16,
                  log=lambda s: None)
  spec, state, _ = run_lib.load(run)
  return spec, state, datastore.load(out, spec, params=state['params']), run, out


def _jit(spec, **kw):
  """The model's apply, compiled (eager Flax apply of the scan is several times slower)."""
  model = make_model(spec, **kw)
  return jax.jit(lambda v, t, threshold, retrieval=None: model.apply(
      v, t, threshold=threshold, retrieval=retrieval))


def _half_gate(ds):
  """A gate that fires where the query's first entry is positive (about half the tokens):
  the tiny run's tuned gate fires everywhere."""
  d = ds.keys_XID.shape[-1]
  return dict(ds.arrays(gate_threshold=0.5),
              gate={'w': jnp.zeros((gate.SCALARS + d,)).at[gate.SCALARS].set(10.0),
                    'b': jnp.float32(0.0)})


def test_retrieve_never_and_silent_gate_equal_the_plain_model(store):
  spec, state, ds, _, _ = store
  variables = {'params': state['params'], 'moe_state': state['moe_state']}
  tokens = jnp.asarray(np.frombuffer(CORPUS['m3.py'].encode(), np.uint8)[:48].reshape(2, 24),
                       jnp.int32)
  thr = OperatingPoint(0.3).vector(spec)
  plain, aux0 = _jit(spec)(variables, tokens, threshold=thr)
  never = datastore.with_retrieval(spec, ds.retrieval_spec('never'))
  out, _ = _jit(never)(variables, tokens, threshold=thr)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
  silent = datastore.with_retrieval(spec, ds.retrieval_spec('gate'))
  out, aux = _jit(silent)(variables, tokens, threshold=thr,
                                      retrieval=ds.arrays(gate_threshold=gate.NEVER))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
  np.testing.assert_array_equal(np.asarray(aux['layers']), np.asarray(aux0['layers']))
  assert not np.asarray(aux['retrievals']).any()
  # always: every token retrieves at every step it runs; at full depth the output is the
  # interpolation of the last exit head with the last step's neighbours
  always = datastore.with_retrieval(spec, ds.retrieval_spec('always'))
  full = OperatingPoint.full_depth().vector(spec)
  arrays = ds.arrays()
  out, aux = _jit(always)(variables, tokens, threshold=full, retrieval=arrays)
  np.testing.assert_array_equal(np.asarray(aux['retrievals']), spec.model.num_steps)
  lm_logits, aux_lm = _jit(spec, keep_states=True)(variables, tokens, threshold=full)
  q = arm.query(aux_lm['step_states'][-1], state['params']['final_norm_scale'])
  d, i = knn.search(q.reshape(-1, q.shape[-1]), ds.keys_XID[-1], ds.retrieval_spec('always')
                    .neighbours, valid_I=ds.valid_I)
  p = knn.knn_probs(d, knn.lookup(ds.values_I, i), lm_logits.shape[-1], arrays['temperature'])
  p = jnp.where(d[:, :1] <= arrays['max_distance'], p, 0.0)  # the tuned distance cut
  want = knn.interpolate(lm_logits.reshape(-1, lm_logits.shape[-1]), p, arrays['lam'])
  # compared as distributions: a token past the distance cut keeps the exit head's logits,
  # which equal interpolate's log p_LM up to a constant per token
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(out)).reshape(want.shape),
                             np.asarray(jax.nn.log_softmax(want)), rtol=2e-3, atol=2e-3)
  # the loop that really stops retrieves and exits exactly as the masked scan
  gated = datastore.with_retrieval(spec, ds.retrieval_spec('gate'))
  a = _half_gate(ds)
  out_s, aux_s = _jit(gated)(variables, tokens, threshold=thr, retrieval=a)
  n_got = int(np.asarray(aux_s['retrievals']).astype(bool).sum())
  assert 0 < n_got < tokens.size, n_got  # the gate fires for some tokens, not all
  out_w, aux_w = inference.forward_while(gated, variables, tokens, thr, retrieval=a)
  np.testing.assert_allclose(np.asarray(out_w), np.asarray(out_s), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux_w['retrievals']), np.asarray(aux_s['retrievals']))
  np.testing.assert_array_equal(np.asarray(aux_w['layers']), np.asarray(aux_s['layers']))


def test_generate_with_the_arm(store):
  """Decoding with a KV cache: a silent gate decodes exactly as the plain model; the listing
  of `generate --datastore --retrieve=always` marks every byte's searches."""
  spec, state, ds, run, path = store
  variables = {'params': state['params'], 'moe_state': state['moe_state']}
  prompt = jnp.asarray([[257] + list(b'def f3_1(x):')], jnp.int32)
  thr = OperatingPoint(0.3)
  plain = inference.generate(spec, variables, prompt, 8, thr)
  silent = datastore.with_retrieval(spec, ds.retrieval_spec('gate'))
  out = inference.generate(silent, variables, prompt, 8, thr,
                           retrieval=ds.arrays(gate_threshold=gate.NEVER))
  np.testing.assert_array_equal(np.asarray(out['tokens']), np.asarray(plain['tokens']))
  np.testing.assert_array_equal(np.asarray(out['layers']), np.asarray(plain['layers']))
  assert not np.asarray(out['retrievals']).any()
  # an active gate: the compacting loop (rows gathered into smaller buckets, the kNN carry
  # with them) decodes exactly as the plain loop
  gated = datastore.with_retrieval(spec, ds.retrieval_spec('gate'))
  a = _half_gate(ds)
  prompts = jnp.concatenate([prompt, prompt[:, ::-1]], 0)
  plain_g = inference.generate(gated, variables, prompts, 8, thr, retrieval=a)
  compact = inference.generate(gated, variables, prompts, 8, thr, compact=True, retrieval=a)
  np.testing.assert_array_equal(np.asarray(compact['tokens']), np.asarray(plain_g['tokens']))
  np.testing.assert_array_equal(np.asarray(compact['retrievals']),
                                np.asarray(plain_g['retrievals']))
  assert np.asarray(plain_g['retrievals']).any()
  text = listing.retrieval_listing(run, path, 'def f3_1(x):', 'always', 0.3, max_new=8)
  assert 'kNN    ' in text and 'retrieve=always: 100% of bytes retrieved' in text


@pytest.mark.slow  # ~25 s; default tier: test_sharded_search_matches_one_device (the search)
def test_datastore_split_over_devices_gives_the_same_evaluation(base, store, multidevice):
  run, files = base
  path = store[4]
  out = multidevice(f'''
    from act_jax.retrieval import datastore
    kw = dict(modes=['always', 'gate'], files={files!r}, num_batches=1, log=lambda s: None)
    one = datastore.evaluate_run({run!r}, {path!r}, devices=1, **kw)
    four = datastore.evaluate_run({run!r}, {path!r}, devices=4, **kw)
    for a, b in zip(one, four):
      assert abs(a['accuracy'] - b['accuracy']) < 1e-6, (a, b)
      assert abs(a['loss'] - b['loss']) < 1e-4, (a, b)
      assert a['retrieval_rate'] == b['retrieval_rate'] and a['layers_mean'] == b['layers_mean']
    print('same', one[0]['retrieval_rate'])
  ''', devices=4)
  assert 'same 1.0' in out


def test_retrieval_refusals(base, store):
  spec, _, ds, _, _ = store
  _, files = base
  datastore.check_disjoint(ds, spec, files)  # built from the train split: disjoint
  held = datastore.data_lib.make_dataset(
      dataclasses.replace(spec.data, name='files', files=files), spec.seed).heldout_texts()
  leaky = dataclasses.replace(ds, meta=dict(ds.meta, document_hashes=[
      datastore.doc_hash(held[0][1])]))
  with pytest.raises(ConfigError, match='1 held-out evaluation document.*read the answers'):
    datastore.check_disjoint(leaky, spec, files)
  with pytest.raises(ConfigError, match="--retrieve='sometimes': allowed: never, always, gate"):
    ds.retrieval_spec('sometimes')
  act = config_lib.resolve(lm.get_config('runlocal,halting=act'), device_count=1)
  with pytest.raises(ConfigError, match='exit head'):
    arm.check_model(act)


# ----------------------------------------------------------------------------- fallback
def _moe(fallback='max_prob', threshold=0.5, shared=1):
  m = config_lib.moe_spec(router='top_k', num_experts=4, top_k=2, d_ff=8,
                          shared_experts=shared, fallback=fallback, fallback_threshold=threshold)
  return MoEFFN(m, d_model=4, d_ff=8, causal=True)


def test_fallback_uniform_router_goes_generalist():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 4)), jnp.float32)
  layer = _moe()
  params = nn.unbox(layer.init(jax.random.PRNGKey(0), x)['params'])
  # token 0 sees a zero router row (uniform p = 1/4 < 0.5); token 1 one confident expert
  w = np.zeros((4, 4), np.float32)
  w[0, 2] = 50.0
  x = x.at[0, 0, 0].set(0.0).at[0, 1, 0].set(1.0)
  params = dict(params, router=jnp.asarray(w))
  y, aux = jax.jit(layer.apply)({'params': params}, x)
  np.testing.assert_array_equal(np.asarray(aux['fallback']), [[True, False]])
  np.testing.assert_allclose(aux['fallback_frac'], 0.5)
  shared = GatedMLP(8).apply({'params': params['shared']}, x)
  np.testing.assert_allclose(np.asarray(y[0, 0]), np.asarray(shared[0, 0]), rtol=1e-6)
  assert not np.allclose(np.asarray(y[0, 1]), np.asarray(shared[0, 1]))  # routed + shared
  # without fallback the uniform token mixes two routed experts into its output
  y0, aux0 = jax.jit(_moe('none').apply)({'params': params}, x)
  assert not np.allclose(np.asarray(y0[0, 0]), np.asarray(shared[0, 0]))
  assert not np.asarray(aux0['fallback']).any()

  # differentiable where trained: the fallback token trains the generalist, not the experts
  def loss(p, t):
    return jnp.sum(layer.apply({'params': p}, x)[0][0, t] ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g0 = grad(params, 0)
  assert np.abs(np.asarray(g0['shared']['w_out'])).sum() > 0
  for name in ('w_in', 'w_gate', 'w_out'):
    np.testing.assert_array_equal(np.asarray(g0[name]), 0.0)
  g1 = grad(params, 1)
  assert np.abs(np.asarray(g1['w_out'])).sum() > 0


def test_fallback_config_refusals():
  with pytest.raises(ConfigError, match="moe.fallback='bogus': allowed: none, max_prob, entropy"):
    config_lib.resolve(_cfg(fallback='bogus'), device_count=1)
  with pytest.raises(ConfigError, match='moe.shared_experts >= 1'):
    config_lib.resolve(_cfg(fallback='max_prob', fallback_threshold=0.3), device_count=1)
  with pytest.raises(ConfigError, match=r'moe.fallback_threshold=1.5: must be in \[0, 1\]'):
    config_lib.resolve(_cfg(fallback='max_prob', fallback_threshold=1.5, shared_experts=1),
                       device_count=1)
  with pytest.raises(ConfigError, match="token-choice router.*moe.router='hash'"):
    config_lib.resolve(_cfg(router='hash', fallback='entropy', shared_experts=1),
                       device_count=1)


def _cfg(**moe):
  c = lm.get_config('runlocal')
  c.moe.update(moe)
  return c


def test_fallback_run_calibrates_and_counts(base, shared_runs):
  """A tiny run with a shared expert (the shared run 'lm_shared_expert'): calibrated to 10 %
  of in-domain (token, MoE layer) pairs on one half of the held-out batches, the other half
  falls back at about that rate; without fallback nothing does. Windows spread over the text
  come in document order."""
  _, files = base
  path = shared_runs.path('lm_shared_expert')
  rows = fallback_run.evaluate_run(path, ['max_prob'], 0.1, files, num_batches=4,
                                   log=lambda s: None)
  by = {(r['fallback'], r['data']): r for r in rows}
  assert by[('none', 'in-domain')]['fallback_rate'] == 0
  assert 0.02 < by[('max_prob', 'in-domain')]['fallback_rate'] < 0.3
  assert by[('max_prob', 'shifted')]['fallback_rate'] > 0
  assert 0 < by[('max_prob', 'in-domain')]['fallback_threshold'] < 1
  assert len(by[('max_prob', 'in-domain')]['fallback_per_layer']) == 2  # 4 layers, moe every 2
  spec = run_lib.read_config(path)
  ds = datastore.data_lib.make_dataset(
      dataclasses.replace(spec.data, name='files', files=files), spec.seed)
  b = ds.spread_batches(2)
  assert len(b) == 2 and b[0]['inputs'].shape == (4, 32)
  assert len({bytes(x) for bb in b for x in bb['inputs'].astype(np.int16)}) == 8  # distinct
