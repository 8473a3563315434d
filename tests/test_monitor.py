"""The drift monitor: shadow scoring equals calibrate's sweep, the live test equals
Learn-then-Test on the same counts, a synthetic drift raises the alarm after the switch and
never without it, shadowing never changes served bytes, and --from_serving writes a
calibration.json every binary reads."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax.calibrate import certify, ltt
from act_jax.calibrate import counts as counts_lib
from act_jax.calibrate.operating_point import run_operating_point, sweep
from act_jax.data import PAD as PAD_ID
from act_jax.errors import ConfigError
from act_jax.model.transformer import make_model
from act_jax.run import directory as run_lib
from act_jax.serve import monitor, scheduler, serving, slo
from act_jax.serve.engine import Engine
from act_jax.spec import NEVER_EXIT, OperatingPoint
from experiments.configs import lm


@pytest.fixture(scope='module')
def model():
  spec = config_lib.resolve(lm.get_config('runlocal'), device_count=1)
  v = make_model(spec).init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8), jnp.int32))
  return spec, nn.meta.unbox({'params': v['params'], 'moe_state': v.get('moe_state', {})})


def _counts(errors, broken=None, fixed=None, n=2000, full_correct=1000):
  k = len(errors)
  z = np.zeros(k, np.int64)
  return monitor.ShadowCounts(n, np.asarray(errors, np.int64),
                              z if broken is None else np.asarray(broken, np.int64),
                              z if fixed is None else np.asarray(fixed, np.int64),
                              np.zeros(k), full_correct, 0.0)


# ----------------------------------------------------------------------------- the tests
def test_window_certificate_equals_ltt_select_on_the_same_counts():
  # full depth, then 4 points; errors out of 2000 at tolerance 5%, risk 5%
  errors = [0, 20, 60, 95, 130]
  c = _counts(errors)
  got = monitor.certify_counts(c, [1, 2, 3, 4], 'consistency', 0.05, 0.05)
  ref = ltt.ltt_select([0.9, 0.8, 0.7, 0.6], None, 2000, 0.05, 0.05,
                       num_errors=errors[1:])
  assert got['valid'].tolist() == ref['valid'].tolist() == [True, True, False, False]
  np.testing.assert_allclose(got['pvalues'], ref['pvalues'])
  # accuracy: tolerance relative to the window's full-depth accuracy (1000/2000 = 0.5)
  c = _counts([0, 30, 60, 90, 120], broken=[0, 10, 20, 40, 80], fixed=[0, 5, 5, 5, 5])
  got = monitor.certify_counts(c, [1, 2, 3, 4], 'accuracy', 0.05, 0.05)
  ref = ltt.ltt_select_accuracy([0.9, 0.8, 0.7, 0.6], 2000, [10, 20, 40, 80], [5, 5, 5, 5],
                                0.025, 0.05)
  assert got['valid'].tolist() == ref['valid'].tolist()
  assert got['valid'].tolist() == [True, True, False, False]
  with pytest.raises(ltt.InsufficientCalibrationData):
    monitor.certify_counts(_counts([0, 0], n=20), [1], 'consistency', 0.05, 0.05)


def test_violation_test_known_answers():
  # tolerance 10%, n = 1000: 150 errors is 5 sigma above; 100 is exactly at it
  c = _counts([0, 100, 150, 115], n=1000)
  assert monitor.violations(c, 'consistency', 0.10, 0.05).tolist() == [False, False, True,
                                                                        False]
  # the binomial upper tail, by hand, for 131 errors: P(Binom(1000, .1) >= 131) < 0.05
  tail = 1.0 - ltt.binomial_pvalue(1000, 130, 0.10)
  assert tail < 0.05
  assert monitor.violations(_counts([0, 131], n=1000), 'consistency', 0.10, 0.05)[1]
  # accuracy: d = broken - fixed; tolerance 0.05 x accuracy 0.5 = 2.5% absolute
  c = _counts([0, 100, 100], broken=[0, 90, 20], fixed=[0, 10, 10], n=1000, full_correct=500)
  assert monitor.violations(c, 'accuracy', 0.05, 0.05).tolist() == [False, True, False]


def test_monitor_keeps_a_certificate_until_contradicted_and_recertifies():
  mon = monitor.Monitor([True, True, True, False], 'consistency', 0.10, 0.05, 1000)
  assert mon.chain == [1, 2]  # an offline-uncertified point is never tested
  assert mon.add(_counts([0, 1, 2, 5], n=20)) == ([], [])
  assert mon.status == 'insufficient'  # 20 tokens cannot certify at 10% / 5% (29 can)
  # 1000 clean tokens: both chain points certified; point 3 never
  lost, gained = mon.add(_counts([0, 20, 60, 0], n=1000))
  assert (lost, gained) == ([], []) and mon.status == 'live'
  assert mon.certified == (True, True, True, False)
  # point 2 at 11% errors: not certified on the window, but not a violation either: it stays
  mon = monitor.Monitor([True, True, True], 'consistency', 0.10, 0.05, 1000)
  assert mon.add(_counts([0, 20, 110], n=1000)) == ([], [])
  assert mon.certified == (True, True, True)
  # the window slides to a drifted 1000 tokens: point 2 violates at 20%
  assert mon.add(_counts([0, 30, 200], n=1000)) == ([2], [])
  assert mon.window.n == 1000  # the first request left the window
  assert mon.certified == (True, True, False)
  # back to clean traffic: certified again
  assert mon.add(_counts([0, 10, 40], n=1000)) == ([], [2])
  with pytest.raises(ConfigError, match='--monitor_window=10: .* at least 299 shadow'):
    monitor.Monitor([True, True], 'consistency', 0.01, 0.05, 10)
  # accuracy: the least window in which a point that changes nothing passes the test
  need = ltt.min_samples_accuracy(0.05, 0.05)
  assert ltt.bernstein_pvalue(need, 0.0, 0.0, 0.05) <= 0.05
  assert ltt.bernstein_pvalue(need - 1, 0.0, 0.0, 0.05) > 0.05
  with pytest.raises(ConfigError, match=f'--monitor_window={need - 1}: .* at least {need} '):
    monitor.Monitor([True, True], 'accuracy', 0.05, 0.05, need - 1)
  monitor.Monitor([True, True], 'accuracy', 0.05, 0.05, need)


def test_controllers_restricted_to_the_certified_points():
  pts = [slo.Point(NEVER_EXIT, None, True, 4.0, label='full'),
         slo.Point(0.9, None, True, 3.0), slo.Point(0.5, None, True, 2.0),
         slo.Point(0.2, None, True, 1.0)]
  fixed = slo.FixedController(pts, 2)
  fixed.update(0.0, queue_len=0, oldest_wait_s=0.0)
  fixed.restrict([True, True, False, False], 1.0)
  assert fixed.index == 1 and fixed.history[-1] == (1.0, 1)
  fixed.restrict([True, False, False, False], 2.0)
  assert fixed.index == 0
  fixed.restrict([True, True, True, True], 3.0)
  assert fixed.index == 2  # home again
  ctl = slo.SLOController(pts, 1.0, start=3)
  ctl.update(0.0, queue_len=0, oldest_wait_s=0.0)
  ctl.restrict([True, True, False, False], 1.0)
  assert ctl.index == 1
  # overloaded: it may only move to a usable point, and none cheaper than 1 is usable
  for t in (2.0, 3.0, 4.0):
    ctl.update(t, queue_len=50, oldest_wait_s=5.0)
  assert ctl.index == 1


def test_scorer_counts_equal_calibrates_sweep(model):
  spec, v = model
  points = [OperatingPoint.full_depth(), OperatingPoint(0.3), OperatingPoint(0.2, 2),
            OperatingPoint(0.05)]
  scorer = monitor.ShadowScorer(spec, v, points)
  rng = np.random.default_rng(0)
  for length in (21, 17):  # inputs 20 and 16 tokens: padded to the 32 and 16 buckets
    prompt = [int(x) for x in rng.integers(0, 256, length)]
    c = scorer.score(prompt)
    width = next(b for b in scorer.buckets if b >= length - 1)
    inputs = np.full((1, width), PAD_ID, np.int32)
    inputs[0, :length - 1] = prompt[:-1]
    targets = np.full((1, width), PAD_ID, np.int32)
    targets[0, :length - 1] = prompt[1:]
    batch = {'inputs': inputs, 'targets': targets,
             'weights': (np.arange(width) < length - 1).astype(np.float32)[None]}
    assert c.n == length - 1
    for k, p in enumerate(points):
      r = sweep(spec, v, [batch], [p.threshold], max_layers=p.max_layers)
      assert (c.errors[k], c.broken[k], c.fixed[k]) == (
          r['num_errors'][0], r['broken'][0], r['fixed'][0]), (length, p)
      assert c.layers[k] == pytest.approx(r['mean_layers'][0] * c.n)
    assert c.errors[0] == 0
  assert sum(c.errors[1:]) > 0  # the points differ from full depth: the counts mean something


def _drift_setup(model, texts):
  """A chain (full depth, one point) whose point agrees with full depth on `texts['a']`
  prompts and not on `texts['b']`, chosen by scoring: the synthetic drift."""
  spec, v = model
  rng = np.random.default_rng(3)
  prompts = [[int(x) for x in rng.integers(0, 256, 24)] for _ in range(80)]
  probe = monitor.ShadowScorer(spec, v, [OperatingPoint.full_depth(), OperatingPoint(0.05)])
  err = [probe.score(p).errors[1] / 23 for p in prompts]
  order = np.argsort(err)
  return probe, [prompts[i] for i in order[:24]], [prompts[i] for i in order[-24:]], \
      [err[i] for i in order]


def _serve(model, prompts, shadow, points):
  spec, v = model
  engine = Engine(spec, v, slots=2, steps_per_call=2)
  engine.warmup(OperatingPoint.full_depth())
  # arrivals 30 ms apart: shadow scoring runs in the idle time between them
  reqs = [scheduler.Request(i, 0.03 * i, p, 3) for i, p in enumerate(prompts)]
  ops = [OperatingPoint(p.threshold, p.max_layers) for p in points]
  ctl = slo.FixedController(points, 1)
  res = scheduler.replay(engine, reqs, ops, ctl, shadow=shadow)
  return res, ctl


def test_synthetic_drift_alarms_after_the_switch_and_never_without(model):
  probe, easy, hard, err = _drift_setup(model, None)
  lo, hi = float(np.mean(err[:24])), float(np.mean(err[-24:]))
  assert hi > lo + 0.15, (lo, hi)  # a real difference between the two 'corpora'
  tol = (lo + hi) / 2
  points = [slo.Point(NEVER_EXIT, None, True, 4.0, label='full depth'),
            slo.Point(0.05, None, True, 2.0, label='0.05')]

  def shadow():
    mon = monitor.Monitor([True, True], 'consistency', tol, 0.05, 200)
    return monitor.Shadow(probe, mon, monitor.ShadowOptions(1.0, 200),
                          [p.label for p in points])

  # no drift: easy prompts only, never an alarm; the bytes equal serving without a shadow
  sh = shadow()
  calm, ctl = _serve(model, easy, sh, points)
  assert len(sh.rows) == len(easy) and not sh.events and ctl.index == 1
  plain, _ = _serve(model, easy, None, points)
  assert [r.tokens for r in calm['records']] == [r.tokens for r in plain['records']]
  # the switch (easy, hard) and the return (easy again), one trace: the alarm comes after
  # the switch, the point moves to full depth; the window certifies it again after the return
  sh = shadow()
  res, ctl = _serve(model, easy + hard + easy, sh, points)
  alarms = [e for e in sh.events if e['event'] == 'alarm']
  assert alarms and all(e['request'] >= len(easy) for e in sh.events)
  assert alarms[0]['moved'] == {'': [1, 0]}
  assert any(e['event'] == 'alarm' for r in res['records'] for e in r.events)
  assert all(set(r.points) == {1} for r in res['records'][:len(easy)])
  kinds = [e['event'] for e in sh.events]
  assert kinds[0] == 'alarm' and kinds[-1] == 'recertified', kinds
  back = sh.events[-1]
  assert back['request'] >= len(easy) + len(hard) and back['moved'] == {'': [0, 1]}
  assert ctl.index == 1
  # between the alarm and the recertification every admitted request decodes at full depth
  between = [r for r in res['records'] if alarms[0]['t'] < r.admitted_s
             and r.done_s is not None and r.done_s < back['t']]
  assert between and all(set(r.points) == {0} for r in between)
  assert all(set(r.points) == {1} for r in res['records'] if r.admitted_s > back['t'])


def test_from_serving_writes_a_calibration_every_reader_takes(model, shared_runs, tmp_path):
  probe, easy, hard, _ = _drift_setup(model, None)
  run = shared_runs.copy('lm', str(tmp_path / 'run'))
  spec = run_lib.read_config(run)
  # a log over the shared run's own chain (full depth, 0.5, 0.3 cap 2)
  chain = [OperatingPoint.full_depth(), OperatingPoint(0.5), OperatingPoint(0.3, 2)]
  _, v, _ = run_lib.load(run)
  scorer = monitor.ShadowScorer(spec, v, chain)
  labels = ['full depth', '0.5', '0.3 cap 2']
  sh = monitor.Shadow(scorer, monitor.Monitor([True, True, True], 'consistency', 0.5, 0.2,
                                              100),
                      monitor.ShadowOptions(1.0, 100), labels)
  rng = np.random.default_rng(1)
  for i in range(40):
    sh.offer(i, [int(x) for x in rng.integers(0, 256, 30)], 1)
  while sh.pending:
    sh.run_one(0.0)
  out = tmp_path / 'serve'
  out.mkdir()
  monitor.write_jsonl(sh, str(out / 'shadow.jsonl'))
  res = certify.certify_from_serving(run, str(out), log=lambda s: None)
  saved = json.load(open(os.path.join(run, 'calibration.json')))
  assert saved == json.loads(json.dumps(res))
  # the counts it certified on, recomputed from the rows: even rows calibrate, odd ones test
  rows = sh.rows
  cal_n = sum(r['n'] for r in rows[0::2])
  assert saved['n_calib_tokens'] == cal_n and saved['n_test_tokens'] == sum(
      r['n'] for r in rows[1::2])
  errs = np.sum([r['errors'] for r in rows[0::2]], 0)
  ref = ltt.ltt_select([2.0, 1.0], None, cal_n, 0.5, 0.2, num_errors=errs[1:])
  assert [p['certified'] for p in saved['points']] == ref['valid'].tolist()
  # every reader: the serving chain, the run's default point
  points = serving.load_points(run, spec)
  flags = {(p['threshold'], p['max_layers']): p['certified'] for p in saved['points']}
  assert len(points) >= 2 and points[0].threshold == NEVER_EXIT
  assert all(flags[(p.threshold, p.max_layers)] == p.certified for p in points[1:])
  op, source = run_operating_point(run, spec)
  if saved['chosen_threshold'] is not None:
    assert (op.threshold, op.max_layers) == (saved['chosen_threshold'], saved['max_layers'])
    assert source.endswith('calibration.json')
  # a damaged log: one line naming the file and the line
  (out / 'shadow.jsonl').write_text(open(out / 'shadow.jsonl').read() + '{"kind": "request"}\n')
  with pytest.raises(ConfigError, match=r'shadow.jsonl:42: not a shadow log line'):
    certify.certify_from_serving(run, str(out), log=lambda s: None)


def test_shadow_time_counts_in_the_controllers_occupancy(model):
  """Half of the time since the last round spent scoring: 1 busy slot of 4 reads as 0.5."""
  spec, v = model
  seen = []

  class Recording(slo.FixedController):
    def update(self, now_s, **kw):
      seen.append(kw['occupancy'])
      return super().update(now_s, **kw)

  points = [slo.Point(NEVER_EXIT, None, True, 4.0, label='full depth')]
  probe = monitor.ShadowScorer(spec, v, [OperatingPoint.full_depth()])
  sh = monitor.Shadow(probe, monitor.Monitor([True], 'consistency', 0.5, 0.2, 64),
                      monitor.ShadowOptions(1.0, 64), ['full depth'])
  sched = scheduler.Scheduler(Engine(spec, v, slots=4), [OperatingPoint.full_depth()],
                              Recording(points), shadow=sh)
  sched.submit(scheduler.Request(0, 0.0, [65, 66, 67], 8))
  sched.iterate(lambda: 1.0)   # admitted, prefilled, one decode step
  sched._shadow_s, sched._last_round_t = 0.05, 0.9  # 50 ms of the last 100 ms scoring
  sched.iterate(lambda: 1.0)
  assert seen[-1] == pytest.approx(0.25 / 0.5)
  sched.iterate(lambda: 1.1)   # no shadow work since: the plain fraction
  assert seen[-1] == pytest.approx(0.25)


def test_shadow_log_round_trip_and_a_failed_write_keeps_the_old_log(tmp_path):
  """The log's writer and reader (calibrate/counts.py) agree, sums and statistics have known
  answers, and a write that fails half way leaves the previous log whole."""
  header = {'measure': 'consistency', 'tolerance': 0.1, 'risk': 0.1,
            'points': [{'threshold': 2.0, 'max_layers': None}, {'threshold': 0.5,
                                                                 'max_layers': None}]}
  a, b = _counts([0, 3], [0, 2], [0, 1], n=10, full_correct=6), _counts([0, 1], n=5,
                                                                        full_correct=5)
  rows = [{'id': 0, 't': 0.0, 'point': 1, **a.as_json()}, {'id': 1, 't': 1.0, 'point': 1,
                                                            **b.as_json()}]
  counts_lib.write_shadow_log(str(tmp_path / counts_lib.SHADOW_LOG), header, rows)
  got_header, got = counts_lib.read_shadow_log(str(tmp_path))
  assert got_header['points'] == header['points'] and len(got) == 2
  st = counts_lib.stats(counts_lib.add(*got))
  assert st['tokens'] == 15 and st['full_accuracy'] == pytest.approx(11 / 15)
  np.testing.assert_allclose(st['agreement'], [1.0, 1 - 4 / 15])
  np.testing.assert_allclose(st['accuracy'], [11 / 15, (11 + 1 - 2) / 15])
  st = counts_lib.stats(counts_lib.add(counts_lib.add(*got), got[1], -1))  # b leaves again
  np.testing.assert_allclose(st['agreement'], [1.0, 0.7])
  before = (tmp_path / counts_lib.SHADOW_LOG).read_bytes()
  with pytest.raises(TypeError):  # not JSON: the write fails after the header
    counts_lib.write_shadow_log(str(tmp_path / counts_lib.SHADOW_LOG), header,
                                rows + [{'id': object()}])
  assert (tmp_path / counts_lib.SHADOW_LOG).read_bytes() == before
