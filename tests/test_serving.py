"""Continuous-batching early-exit serving: equal to decoding alone, refusals, the binary."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax.calibrate import certify
from act_jax.errors import ConfigError
from act_jax.infer import inference
from act_jax.model.moe import routers
from act_jax.model.transformer import init_cache, make_model
from act_jax.run import directory as run_lib
from act_jax.serve import engine as engine_lib
from act_jax.serve import scheduler, serving
from act_jax.serve import summary as summary_lib
from act_jax.spec import NEVER_EXIT, OperatingPoint
from act_jax.viz import report
from experiments.configs import lm
from tests.conftest import binary_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def model():
  """runlocal adaptive LM (confidence exits + top-2 MoE with capacity), random weights."""
  spec = config_lib.resolve(lm.get_config('runlocal'), device_count=1)
  v = make_model(spec).init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8), jnp.int32))
  return spec, nn.meta.unbox({'params': v['params'], 'moe_state': v.get('moe_state', {})})


def _requests():
  # 3 slots, 5 requests: #3 and #4 join when #1 and #0 leave, at other rows' positions;
  # prompt lengths 5..13 fall in the 16-bucket, 19 in the 32-bucket (padded prefill).
  rng = np.random.default_rng(1)
  shapes = [(13, 6), (5, 3), (19, 9), (9, 7), (5, 3)]
  return [scheduler.Request(i, 0.0, [int(x) for x in rng.integers(0, 256, p)], n)
          for i, (p, n) in enumerate(shapes)]


def _exiting_threshold(spec, v, reqs):
  """The median first-exit confidence: about half the tokens exit at the first exit."""
  toks = jnp.asarray([r.prompt[:5] for r in reqs], jnp.int32)
  aux = make_model(spec).apply(v, toks, threshold=NEVER_EXIT)[1]
  conf = jax.nn.softmax(aux['step_logits'][0], -1).max(-1)
  return float(jnp.median(conf))


_REFS = {}  # (request id, threshold) -> inference.generate alone: one compile per shape


def _alone(spec, v, r, point):
  key = (r.id, point.threshold)
  if key not in _REFS:
    _REFS[key] = inference.generate(spec, v, np.asarray(r.prompt)[None], r.max_new, point)
  return _REFS[key]


@pytest.mark.parametrize('full_depth,kv_fill,compact,per_call', [
    # slow (~15-60 s each): full depth, and eager fill one step per call; the default tier
    # keeps the configuration with the most moving parts (exits, lazy fill, compaction,
    # 3 steps per call) and eager-fill engines in the tests below
    pytest.param(True, 'project', False, 1, marks=pytest.mark.slow),
    pytest.param(False, 'project', False, 1, marks=pytest.mark.slow),
    (False, 'lazy', True, 3)])
def test_continuous_batching_equals_decoding_alone(model, full_depth, kv_fill, compact,
                                                   per_call):
  spec, v = model
  reqs = _requests()
  thr = _exiting_threshold(spec, v, reqs)
  # reference: inference.generate of each request alone (one position for the batch, eager
  # KV fill); served: 3 slots, per-row positions, eager or lazy fill, waiting or compacted
  # (3 decode steps per call: rows finish mid-call and idle until it returns)
  point = OperatingPoint.full_depth() if full_depth else OperatingPoint(thr)
  engine = engine_lib.Engine(spec, v, slots=3, kv_fill=kv_fill, compact=compact,
                             steps_per_call=per_call)
  out = scheduler.replay(engine, reqs, [point], realtime=False)
  layers = []
  for r, rec in zip(reqs, out['records']):
    ref = _alone(spec, v, r, point)
    assert rec.tokens == [int(x) for x in ref['tokens'][0]], (r.id, point, kv_fill)
    np.testing.assert_allclose(rec.layers, np.asarray(ref['layers'][0]))
    assert rec.error is None and rec.done_s is not None
    layers += rec.layers
  if point.threshold < NEVER_EXIT:  # rows really exit at different depths
    assert min(layers) < max(layers) == spec.model.num_layers
  else:
    assert set(layers) == {float(spec.model.num_layers)}
  # joins happened while other rows were mid-request; then the batch drained
  assert 3 in {s['active'] for s in out['steps']}
  if per_call == 1:
    assert {s['active'] for s in out['steps']} >= {2, 3}


def test_exact_mode_serving_equals_full_depth_decoding_alone(model):
  """Self-speculative rounds in the slots (2 per call): rows accept different lengths,
  advance by them, finish mid-call and are joined by others; every request's bytes equal
  full-depth decoding of it alone."""
  spec, v = model
  reqs = _requests()
  engine = engine_lib.Engine(spec, v, slots=3, steps_per_call=2, mode='exact', draft_layer=2,
                             draft_len=3)
  out = scheduler.replay(engine, reqs, [OperatingPoint.full_depth()], realtime=False)
  for r, rec in zip(reqs, out['records']):
    ref = _alone(spec, v, r, OperatingPoint.full_depth())
    assert rec.tokens == [int(x) for x in ref['tokens'][0]], r.id
  acc = [a for st in out['steps'] for a in st['accepted']]
  assert min(acc) < max(acc) and 0 <= min(acc) and max(acc) <= 3
  assert 3 in {s['active'] for s in out['steps']}
  summary = summary_lib.summarize(out, None, [])
  assert summary['rounds'] == len(acc)
  with pytest.raises(ConfigError, match='--compact/--kv_fill apply to --mode=threshold'):
    engine_lib.Engine(spec, v, slots=2, compact=True, mode='exact', draft_layer=2, draft_len=2)
  with pytest.raises(ConfigError, match='--draft_layer=3'):
    engine_lib.Engine(spec, v, slots=2, mode='exact', draft_layer=3, draft_len=2)


@pytest.mark.slow  # ~33 s; lazy == eager decoding also holds in the default tier through
# test_continuous_batching_equals_decoding_alone[False-lazy-True-3] (lazy slots vs eager alone)
def test_lazy_kv_fill_equals_eager(model):
  spec, v = model
  prompt = np.asarray([r.prompt[:5] for r in _requests()[:4]])
  thr = _exiting_threshold(spec, v, _requests())
  eager = inference.generate(spec, v, prompt, 24, thr, kv_fill='project')
  lazy = inference.generate(spec, v, prompt, 24, thr, kv_fill='lazy')
  np.testing.assert_array_equal(lazy['tokens'], eager['tokens'])
  np.testing.assert_array_equal(lazy['layers'], eager['layers'])
  layers = np.asarray(eager['layers'])
  assert 1 < layers.mean() < spec.model.num_layers  # exits, and deeper tokens read the fills
  # the lazy state after one step: pending positions fill on demand, exit states stored
  cache = init_cache(spec, 1, 16)
  logits, aux = make_model(spec).apply(v, jnp.asarray(prompt[:1]), threshold=thr, cache=cache,
                                       cache_index=0)
  lz = inference.init_lazy(spec, 1, 16, 5)
  tok = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
  _, a = inference.decode_step(spec, v, aux['cache'], tok, 5, 0.0 + 1e-6, 'lazy', lazy=lz)
  # threshold ~0: the token exits at step 0, so only step 0 is filled to position 6
  np.testing.assert_array_equal(a['lazy']['filled'], [[6, 5]])
  assert float(jnp.abs(a['lazy']['h_exit'][0, 5]).sum()) > 0
  with pytest.raises(ConfigError, match='lazy'):
    inference.decode_step(spec, v, aux['cache'], tok, 5, 0.5, 'lazy')


class _Alternate:
  """A controller that moves every update (points 0, 1, 0, ...): every call changes point."""

  def __init__(self):
    self.n = 0

  def update(self, now_s, **_):
    self.n += 1
    return self.n % 2


def test_rows_at_different_points_equal_their_own_decoding(model):
  """Latency classes: one class at an exiting point, one at full depth, one request naming
  its own point; rows of one batch run at their own points (per-row thresholds [B, N]) and
  each request's bytes and layers equal decoding it alone at its point."""
  spec, v = model
  reqs = _requests()
  thr = _exiting_threshold(spec, v, reqs)
  points = [OperatingPoint.full_depth(), OperatingPoint(thr)]
  classes = {'interactive': _FixedIndex(1), 'batch': _FixedIndex(0)}
  for i, r in enumerate(reqs):
    r.cls = ('interactive', 'batch')[i % 2]
  reqs[4].point = OperatingPoint(0.5)
  engine = engine_lib.Engine(spec, v, slots=3)
  out = scheduler.replay(engine, reqs, points, classes, realtime=False)
  want = {'interactive': points[1], 'batch': points[0]}
  mixed = False
  for r, rec in zip(reqs, out['records']):
    point = r.point or want[r.cls]
    ref = _alone(spec, v, r, point)
    assert rec.tokens == [int(x) for x in ref['tokens'][0]], (r.id, point)
    np.testing.assert_allclose(rec.layers, np.asarray(ref['layers'][0]))
    mixed |= r.cls == 'interactive' and min(rec.layers) < spec.model.num_layers
  assert mixed  # the interactive rows really exited early beside full-depth rows
  assert all(set(s['points']) == {'interactive', 'batch'} for s in out['steps'])
  refused = scheduler.Scheduler(engine, points, classes).submit(
      scheduler.Request(99, 0.0, [65], 2, cls='bulk'))
  assert "latency class 'bulk' is unknown; known: interactive, batch" in refused


class _FixedIndex:
  def __init__(self, index):
    self.index = index

  def update(self, now_s, **_):
    return self.index


def test_nothing_compiles_after_warmup(model):
  """The mid-trace stall (issue #29): weights placed on a mesh (as a restored checkpoint's
  are) made the prefill recompile after the first decode. After warm-up, a trace through
  point changes, two latency classes, three prompt buckets, chunked prompts and batched
  prefills lowers no new program."""
  spec, v = model
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  v = jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  engine = engine_lib.Engine(spec, v, slots=3, prefill_chunk=16)
  points = [OperatingPoint.full_depth(), OperatingPoint(0.5)]
  engine.warmup(points[0])
  rng = np.random.default_rng(2)
  reqs = [scheduler.Request(i, 0.0, [int(x) for x in rng.integers(1, 256, p)], n,
                            cls=('a', 'b')[i % 2])
          for i, (p, n) in enumerate([(3, 4), (12, 2), (20, 5), (27, 3), (9, 6), (5, 1)])]
  before = engine_lib.lowerings()
  out = scheduler.replay(engine, reqs, points, {'a': _Alternate(), 'b': _FixedIndex(1)},
                         realtime=False)
  assert engine_lib.lowerings() == before
  assert all(len(r.tokens) == q.max_new for r, q in zip(out['records'], reqs))
  # the 27-byte prompt took two chunks of at most 16; the others were prefilled together
  assert {s['point'] for s in out['steps']} == {0, 1}


def test_fallback_counts_reach_the_records():
  """moe.fallback with threshold 1: every token of every MoE layer goes to the generalist;
  the engine reports it per byte and the record (what /metrics counts) sums it."""
  c = lm.get_config('runlocal')
  c.moe.update(fallback='max_prob', fallback_threshold=1.0, shared_experts=1)
  spec = config_lib.resolve(c, device_count=1)
  v = make_model(spec).init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8), jnp.int32))
  v = nn.meta.unbox({'params': v['params'], 'moe_state': v.get('moe_state', {})})
  reqs = _requests()[:2]
  out = scheduler.replay(engine_lib.Engine(spec, v, slots=2), reqs,
                         [OperatingPoint.full_depth()], realtime=False)
  moe_layers = sum(k == 'moe' for k in spec.model.layer_kinds) * spec.model.num_steps
  for r, rec in zip(reqs, out['records']):
    # every decoded byte ran every layer (full depth), each MoE layer fell back
    assert rec.fallbacks == moe_layers * len(rec.layers) > 0, (rec.fallbacks, moe_layers)


def test_overlong_request_is_refused_alone(model):
  spec, v = model
  reqs = _requests()[:2] + [scheduler.Request(9, 0.0, [65] * 30, 5),
                            scheduler.Request(10, 0.0, [], 3)]
  out = scheduler.replay(engine_lib.Engine(spec, v, slots=2), reqs, [OperatingPoint(0.5)],
                         realtime=False)
  recs = {r.id: r for r in out['records']}
  assert 'prompt 30 + max_new 5 bytes exceed the model context 32' in recs[9].error
  assert 'empty prompt' in recs[10].error
  assert recs[9].tokens == [] and recs[9].done_s is None
  for i in (0, 1):
    assert recs[i].error is None and len(recs[i].tokens) == reqs[i].max_new


def test_static_batches_wait_for_the_longest_request(model):
  spec, v = model
  reqs = _requests()[:4]
  out = scheduler.replay(engine_lib.Engine(spec, v, slots=2), reqs, [OperatingPoint(0.5)],
                         realtime=False, static_batches=True)
  # batches {0,1} then {2,3}: max_new - 1 decode steps of the longest request each
  assert len(out['steps']) == (6 - 1) + (9 - 1)
  assert [s['active'] for s in out['steps'][:6]] == [2, 2, 1, 1, 1, 2]


def test_capacity_counts_only_real_tokens():
  # S=16, E=4, K=2, cf=1.25: C = ceil(2*16*1.25/4) = 10 static; 9 real tokens -> ceil(5.625)
  valid = jnp.arange(16)[None, :] < jnp.asarray([[16], [9], [0]])
  np.testing.assert_array_equal(routers.capacity_per_group(16, 4, 2, 1.25, valid), [10, 6, 0])
  # a padded group routes its real tokens exactly like the unpadded one
  logits = jax.random.normal(jax.random.PRNGKey(3), (1, 9, 4))
  logits = logits.at[..., 0].add(3.0)  # everyone wants expert 0: capacity binds
  ref = routers.top_k_route(logits, 2, routers.capacity(9, 4, 2, 1.25))
  padded = jnp.concatenate([logits, jnp.zeros((1, 7, 4))], 1)
  run = jnp.arange(16)[None] < 9
  got = routers.top_k_route(padded, 2, routers.capacity(16, 4, 2, 1.25), running_GS=run,
                            capacity_G=routers.capacity_per_group(16, 4, 2, 1.25, run))
  np.testing.assert_array_equal(got.slot_index_GSK[:, :9], ref.slot_index_GSK)
  assert int((ref.slot_index_GSK[..., :] >= 0).sum()) < 18  # some choices were dropped
  without = routers.top_k_route(padded, 2, routers.capacity(16, 4, 2, 1.25), running_GS=run)
  assert int((without.slot_index_GSK[:, :9] >= 0).sum()) > int((ref.slot_index_GSK >= 0).sum())


@pytest.fixture(scope='module')
def run(shared_runs, tmp_path_factory):
  """A copy of the suite's shared run 'lm', calibrated with a 2-layer cap beside no cap."""
  path = shared_runs.copy('lm', str(tmp_path_factory.mktemp('serve') / 'run'))
  certify.calibrate_run(path, tolerance=0.5, risk=0.2, num_batches=4, caps=[0, 2],
                        log=lambda s: None)
  return path


def test_calibrate_lists_certified_points_per_cap(run):
  saved = json.load(open(os.path.join(run, 'calibration.json')))
  pts = saved['points']
  assert {p['max_layers'] for p in pts} == {None, 2}
  assert len(pts) == 2 * len(saved['frontier']['thresholds'])
  # a 2-layer cap: every token exits by layer 2
  assert all(p['mean_layers'] <= 2.0 + 1e-6 for p in pts if p['max_layers'] == 2)
  for cap in (None, 2):  # fixed sequence: certified points are a prefix of each cap's list
    cert = [p['certified'] for p in pts if p['max_layers'] == cap]
    assert cert == sorted(cert, reverse=True)
  spec = run_lib.read_config(run)
  points = serving.load_points(run, spec)
  assert points[0].threshold == NEVER_EXIT and points[0].certified
  assert len(points) >= 2 and all(p.mean_layers <= spec.model.num_layers for p in points)


def test_serve_binary_end_to_end(run, tmp_path):
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.serve', f'--workdir={run}', f'--out={out}',
       '--trace=poisson:rate=6,duration=2s,prompt=4-12,new=4-12,seed=3', '--slots=4',
       '--slo_p95_ms=5000', '--controller=slo', '--allow_uncertified'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'latency ms' in proc.stdout and '| slowest row exits at layer |' in proc.stdout
  rows = [json.loads(x) for x in open(out / 'requests.jsonl')]
  summary = json.load(open(out / 'summary.json'))
  assert summary['served'] == len(rows) == summary['requests'] > 0
  for r in rows:
    assert r['bytes'] == r['max_new'] and r['done_s'] >= r['first_byte_s'] >= r['arrival_s']
    assert 0.0 <= r['agreement_with_full_depth'] <= 1.0
  assert 0.0 <= summary['agreement_with_full_depth'] <= 1.0
  assert summary['latency_ms']['p50'] <= summary['latency_ms']['p95'] <= \
      summary['latency_ms']['p99']
  assert open(out / 'serve.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  # the report binary's serve section finds the newest replay and redraws it
  assert report.latest_serve_dir(str(tmp_path)) == str(out)
  png = summary_lib.plot_dir(str(out), str(tmp_path / 'again.png'))
  assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_serve_binary_bad_inputs(run, tmp_path):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  cases = (([f'--trace={empty}'], 'no requests'),
           (['--trace=poisson:rate=2,duration=1s', '--slots=0'], '--slots=0'),
           (['--trace=bursty:base=1,peak=2,duration=0s'], 'duration'),
           (['--trace=poisson:rate=2,duration=1s', '--mode=exact'],
            '--mode=exact serves full depth by construction'))
  procs = binary_cases('experiments.serve', [[f'--workdir={run}', '--slo_p95_ms=100'] + args
                                             for args, _ in cases])  # one interpreter
  for (args, msg), proc in zip(cases, procs):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert msg in proc.stderr and proc.stderr.count('\n') == 1, proc.stderr


def test_generate_binary_in_exact_mode(run):
  """generate --mode=exact on a trained run: the continuation equals threshold-mode full
  depth; tuning picks a draft and keeps it in the run. (serve --mode=exact: the next test.)"""
  base = [f'--workdir={run}', '--prompt=def f(', '--max_new_tokens=12']
  exact, full = binary_cases('experiments.generate', [base + ['--mode=exact', '--draft_len=2'],
                                                      base + ['--threshold=1.0']])
  assert exact.returncode == 0 and full.returncode == 0, exact.stderr[-2000:] + full.stderr
  text = lambda out: [l for l in out.splitlines() if l.startswith('text ')]  # noqa: E731
  assert text(exact.stdout) == text(full.stdout) and text(exact.stdout)
  assert 'mode=exact draft_layer=2 draft_len=2 temperature=0 (tuned at batch 1' in exact.stdout
  assert 'bytes per verify step' in exact.stdout


@pytest.mark.slow  # ~25 s; default tier: exact-mode serving in process (above), serve binary
def test_serve_binary_in_exact_mode(run, tmp_path):
  """serve --mode=exact agrees 100 % with full depth."""
  out = tmp_path / 'serve'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.serve', f'--workdir={run}', f'--out={out}',
       '--trace=poisson:rate=6,duration=1s,prompt=4-12,new=4-12,seed=3', '--slots=2',
       '--controller=fixed', '--mode=exact', '--draft_layer=2', '--draft_len=2'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.load(open(out / 'summary.json'))
  assert summary['mode'] == 'exact' and summary['agreement_with_full_depth'] == 1.0
  assert 'drafts accepted per round' in proc.stdout
