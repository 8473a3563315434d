"""SLOController on a simulated server (virtual clock, no model) and its bad inputs.

The simulation: SLOTS decode slots, every request needs TOKENS decode steps once admitted,
FIFO queue, one decode step of point i takes STEP_S[i]. Capacity of point i is
SLOTS / (TOKENS x STEP_S[i]) = 25, 35.7, 50, 71.4 requests/s; the budget is 1 s, full-depth
service 0.32 s. LOW = 10/s is well below full depth; HIGH = 40/s is over points 0 and 1
(1.6x and 1.12x) and under point 2 (0.8x).
"""
import collections
import functools

import numpy as np
import pytest

from act_jax.serve import slo
from act_jax.errors import ConfigError

SLOTS, TOKENS = 8, 16
STEP_S = (0.020, 0.014, 0.010, 0.007)
LAYERS = (8.0, 5.6, 4.0, 2.8)  # mean layers, proportional to the step time
BUDGET = 1.0
LOW, HIGH = 10.0, 40.0
UP, DOWN, END = 20.0, 80.0, 110.0  # load steps up at UP, back down at DOWN


def _points(certified=(True, True, True, True)):
  return [slo.Point(1.0 - 0.1 * i, None, c, m, quality=1.0 - 0.05 * i, label=f'p{i}')
          for i, (c, m) in enumerate(zip(certified, LAYERS))]


def _capacity(i):
  return SLOTS / (TOKENS * STEP_S[i])


def simulate(ctrl, segments, seed=0, occupancy=True):
  """Runs the server until the last segment ends; [n, 2] array of (arrival, latency).

  segments: (start, end, rate) pieces of a Poisson arrival rate."""
  rng = np.random.default_rng(seed)
  arr = np.concatenate([np.sort(rng.uniform(a, b, rng.poisson(r * (b - a))))
                        for a, b, r in segments])
  end = segments[-1][1]
  queue = collections.deque()
  left, admitted = [0] * SLOTS, [0.0] * SLOTS
  t, ai, done, out = 0.0, 0, [], []
  while t < end:
    while ai < len(arr) and arr[ai] <= t:
      queue.append(arr[ai])
      ai += 1
    busy = 0
    for k in range(SLOTS):
      if not left[k] and queue:
        admitted[k], left[k] = queue.popleft(), TOKENS
      busy += left[k] > 0
    i = ctrl.update(t, queue_len=len(queue), oldest_wait_s=t - queue[0] if queue else 0.0,
                    completed=done, occupancy=busy / SLOTS if occupancy else None)
    assert ctrl.usable[i]
    done = []
    if not busy:  # idle: the next step starts with the next arrival
      t = max(t + STEP_S[i], arr[ai] if ai < len(arr) else end)
      continue
    t += STEP_S[i]
    for k in range(SLOTS):
      if left[k]:
        left[k] -= 1
        if not left[k]:
          done.append(t - admitted[k])
          out.append((admitted[k], t - admitted[k]))
  return np.array(out)


def _p95_of(res, t0, t1):
  lat = res[(res[:, 0] >= t0) & (res[:, 0] < t1), 1]
  return float(np.percentile(lat, 95))


@functools.lru_cache(maxsize=None)
def _step_run(seed, occupancy=True, certified=(True, True, True, True), allow=False):
  c = slo.SLOController(_points(certified), BUDGET, allow_uncertified=allow)
  res = simulate(c, [(0, UP, LOW), (UP, DOWN, HIGH), (DOWN, END, LOW)], seed, occupancy)
  return c, res


def test_simulation_is_meaningful_fixed_full_depth_misses_the_budget():
  c = slo.FixedController(_points())
  res = simulate(c, [(0, UP, LOW), (UP, DOWN, HIGH), (DOWN, END, LOW)])
  assert _p95_of(res, 0, UP) < 0.5 * BUDGET  # fine at low load
  assert _p95_of(res, UP + 5, DOWN) > 5 * BUDGET  # 1.6x overloaded: the queue explodes
  assert c.history == [(0.0, 0)]  # (e) never moves
  assert c.time_at_points(END) == [END, 0.0, 0.0, 0.0]


@pytest.mark.parametrize('seed', [0, 1])
def test_load_step_up_moves_cheaper_fast_and_meets_the_budget(seed):
  c, res = _step_run(seed)
  assert c.history[0] == (0.0, 0)
  first = c.history[1][0]
  # The oldest wait grows at 1 - capacity/rate s/s: it crosses high x budget after ~2.1 s.
  lag = c.high * BUDGET / (1 - _capacity(0) / HIGH)
  assert UP + 0.5 * lag < first < UP + lag + 1.5
  # Within 2 s more it sits at a point that can carry 40/s (index 2 or 3), and stays on
  # one of those until the load drops.
  during = [(t, i) for t, i in c.history if UP < t < DOWN]
  settled = next(t for t, i in during if _capacity(i) > HIGH)
  assert settled < first + 2.0
  assert all(_capacity(i) > HIGH for t, i in during if t >= settled)
  assert _p95_of(res, settled + 2.0, DOWN) < BUDGET
  assert _p95_of(res, 0, UP) < 0.5 * BUDGET


@pytest.mark.parametrize('seed', [0, 1])
def test_load_step_down_returns_to_full_depth(seed):
  c, res = _step_run(seed)
  back = [t for t, i in c.history if t > DOWN and i == 0]
  assert back and back[0] < DOWN + 12.0  # up dwell 3 s per point, points 2 -> 1 -> 0
  assert c.history[-1][1] == 0 and c.history[-1][0] == back[0]  # and stays
  assert _p95_of(res, DOWN, END) < BUDGET


def test_without_occupancy_the_step_still_meets_the_budget():
  c, res = _step_run(0, occupancy=False)
  during = [t for t, i in c.history if UP < t < DOWN]
  assert during[0] < UP + 3.5
  assert _p95_of(res, during[0] + 4.0, DOWN) < BUDGET


def test_constant_low_load_never_moves():
  c = slo.SLOController(_points(), BUDGET)
  res = simulate(c, [(0, 60, 15.0)], seed=3)  # 0.6 of full-depth capacity
  assert c.history == [(0.0, 0)]
  assert _p95_of(res, 0, 60) < 0.5 * BUDGET


def test_load_between_two_points_settles_without_oscillation():
  # 28/s: point 0 at 1.12x capacity, point 1 at 0.78x. The occupancy guard predicts 1.1 at
  # point 0, over up_occupancy: the controller stays at point 1.
  c = slo.SLOController(_points(), BUDGET)
  res = simulate(c, [(0, 200, 28.0)], seed=0)
  late = [(t, i) for t, i in c.history if t > 20]
  assert len(late) <= 1
  spent = c.time_at_points(200)
  assert spent[1] > 170
  assert _p95_of(res, 20, 200) < BUDGET


def test_backoff_makes_latency_only_oscillation_rarer():
  # Without occupancy the controller cannot tell that point 0 will not keep up: it probes,
  # fails, backs off. The same run without backoff (up_backoff=1) flips 3x as often.
  counts = []
  for backoff in (2.0, 1.0):
    c = slo.SLOController(_points(), BUDGET, up_backoff=backoff)
    res = simulate(c, [(0, 200, 28.0)], seed=0, occupancy=False)
    counts.append(len([t for t, _ in c.history if t > 20]))
    assert _p95_of(res, 20, 200) < BUDGET
  assert counts[0] < counts[1] / 2, counts
  assert counts[1] > 30, counts


def test_uncertified_point_is_skipped_unless_allowed():
  cert = (True, False, True, True)
  c, _ = _step_run(0, certified=cert)
  assert 1 not in {i for _, i in c.history}
  assert c.history[1][1] == 2  # skips point 1 on the way down ...
  assert c.history[-1][1] == 0 and c.history[-2][1] == 2  # ... and on the way up
  c, _ = _step_run(0, certified=cert, allow=True)
  assert c.history[1][1] == 1


def test_fixed_controller_never_moves():
  c = slo.FixedController(_points(), 2)
  for t in range(5):
    assert c.update(float(t), queue_len=100, oldest_wait_s=10.0, completed=[50.0]) == 2
  assert c.history == [(0.0, 2)] and c.point.label == 'p2'
  assert c.time_at_points(4.0) == [0.0, 0.0, 4.0, 0.0]


# ------------------------------------------------------------- hand-fed signals, exact times


def test_dwell_hysteresis_and_window():
  c = slo.SLOController(_points(), BUDGET)  # high 0.8 s, low 0.5 s
  assert c.update(0.0, queue_len=5, oldest_wait_s=0.9) == 0  # over high, but no dwell yet
  assert c.update(0.4, queue_len=5, oldest_wait_s=0.9) == 0
  assert c.update(0.5, queue_len=5, oldest_wait_s=0.9) == 1  # down_dwell_s = 0.5
  assert c.update(0.9, queue_len=5, oldest_wait_s=0.9) == 1
  assert c.update(1.0, queue_len=5, oldest_wait_s=0.9) == 2
  # Window cleared at the move: the 0.95 s latencies reported before it are forgotten.
  assert c.update(1.2, queue_len=0, oldest_wait_s=0.0, completed=[0.7] * 20) == 2
  assert c.pressure == pytest.approx(0.7)  # in the band: stay
  assert c.update(3.1, queue_len=0, oldest_wait_s=0.0) == 2
  assert c.pressure == pytest.approx(0.7)  # still in the 2 s window
  assert c.update(3.3, queue_len=0, oldest_wait_s=0.0) == 2  # window empty, but dwell 2.3 s
  assert c.pressure == 0.0
  assert c.update(4.0, queue_len=1, oldest_wait_s=0.1) == 2  # a queue blocks recovery
  assert c.update(4.01, queue_len=0, oldest_wait_s=0.0) == 1  # up_dwell_s = 3
  assert c.history == [(0.0, 0), (0.5, 1), (1.0, 2), (4.01, 1)]
  assert c.time_at_points(5.0) == pytest.approx([0.5, 0.5 + 0.99, 3.01, 0.0])
  assert sum(c.time_at_points(5.0)) == pytest.approx(5.0)


def test_p95_is_nearest_rank():
  assert slo.p95([3.0]) == 3.0
  assert slo.p95(range(1, 21)) == 19  # ceil(0.95 * 20) = 19th smallest
  assert slo.p95(range(100, 0, -1)) == 95
  c = slo.SLOController(_points(), BUDGET)
  c.update(0.0, queue_len=0, oldest_wait_s=0.0, completed=[0.1] * 19 + [0.9])
  assert c.pressure == 0.1  # one slow request in 20 is the 5% the p95 ignores
  c.update(0.1, queue_len=0, oldest_wait_s=0.0, completed=[0.9])
  assert c.pressure == 0.9


def test_occupancy_guard_and_backoff():
  c = slo.SLOController(_points(), BUDGET, start=2)
  # Occupancy 0.7 at point 2 predicts 0.7 x 5.6 / 4 = 0.98 at point 1: no recovery.
  for k in range(101):
    assert c.update(k * 0.1, queue_len=0, oldest_wait_s=0.0, occupancy=0.7) == 2
  # 0.6 x 1.4 = 0.84 <= 0.85: up, once the 10 s occupancy window holds mostly 0.6.
  t = 10.0
  while c.index == 2:
    t += 0.1
    c.update(t, queue_len=0, oldest_wait_s=0.0, occupancy=0.6)
  assert 15.0 < t < 20.1
  assert c.up_dwell_now == 3.0
  c.update(t + 1.0, queue_len=3, oldest_wait_s=0.9)  # the probe fails: back down,
  assert c.index == 2 and c.up_dwell_now == 6.0  # and the next probe waits twice as long
  assert c.update(t + 6.9, queue_len=0, oldest_wait_s=0.0) == 2
  assert c.update(t + 7.05, queue_len=0, oldest_wait_s=0.0) == 1
  # A queue holds it at point 1; the backoff lasts until the probe has held probe_s = 30 s.
  assert c.update(t + 37.0, queue_len=1, oldest_wait_s=0.1) == 1
  assert c.up_dwell_now == 6.0
  assert c.update(t + 37.1, queue_len=1, oldest_wait_s=0.1) == 1
  assert c.up_dwell_now == 3.0
  assert c.update(t + 37.2, queue_len=0, oldest_wait_s=0.0) == 0


def test_uncertified_never_returned_hand_fed():
  pts = _points((True, False, False, True))
  for allow, want in ((False, [0, 3]), (True, [0, 1, 2, 3])):
    c = slo.SLOController(pts, BUDGET, allow_uncertified=allow, down_dwell_s=0.0)
    for k in range(10):
      assert c.usable[c.update(0.1 * k, queue_len=9, oldest_wait_s=5.0)]
    assert [i for _, i in c.history] == want


@pytest.mark.parametrize('kwargs, match', [
    (dict(points=[]), 'points=.*at least one'),
    (dict(points=_points((False,) * 4)), 'none of the 4 points is certified'),
    (dict(budget_s=0.0), 'budget_s=0.0'),
    (dict(budget_s=-1.0), 'budget_s'),
    (dict(low=0.9), 'low=0.9: must satisfy 0 < low < high=0.8'),
    (dict(low=0.0), 'low=0.0'),
    (dict(high=1.5), 'high=1.5: must satisfy'),
    (dict(start=4), r'start=4: must be an index in \[0, 3\]'),
    (dict(start=-1), 'start=-1'),
    (dict(points=_points((True, False, True, True)), start=1), 'start=1: .*uncertified'),
    (dict(window_s=0.0), 'window_s=0.0'),
    (dict(up_backoff=0.5), 'up_backoff=0.5'),
    (dict(points=_points()[::-1]), r'points\[1\].mean_layers=4: must be <= points\[0\]'),
])
def test_constructor_errors(kwargs, match):
  args = dict(points=_points(), budget_s=BUDGET) | kwargs
  with pytest.raises(ConfigError, match=match) as e:
    slo.SLOController(args.pop('points'), args.pop('budget_s'), **args)
  assert '\n' not in str(e.value)


def test_fixed_controller_errors_and_update_errors():
  with pytest.raises(ConfigError, match='index=1: .*uncertified'):
    slo.FixedController(_points((True, False, True, True)), 1)
  assert slo.FixedController(_points((True, False)), 1, allow_uncertified=True).index == 1
  c = slo.SLOController(_points(), BUDGET)
  c.update(1.0, queue_len=0, oldest_wait_s=0.0)
  with pytest.raises(ConfigError, match='now_s=0.5: must be finite and never decrease'):
    c.update(0.5, queue_len=0, oldest_wait_s=0.0)
  with pytest.raises(ConfigError, match='queue_len=-1'):
    c.update(2.0, queue_len=-1, oldest_wait_s=0.0)
  with pytest.raises(ConfigError, match='occupancy=1.5'):
    c.update(2.0, queue_len=0, oldest_wait_s=0.0, occupancy=1.5)
  with pytest.raises(ConfigError, match='completed latency -1'):
    c.update(2.0, queue_len=0, oldest_wait_s=0.0, completed=[-1.0])
  with pytest.raises(ConfigError, match='end_s=0.0'):
    c.time_at_points(0.0)
