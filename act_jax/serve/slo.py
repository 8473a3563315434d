"""Operating-point controllers for an early-exit server under a latency SLO.

The server decodes a fixed-slot batch (continuous batching) and, before every decode step,
calls `controller.update(now_s, queue_len=..., oldest_wait_s=..., completed=...,
occupancy=...)`; it returns the index of the operating point (exit threshold, layer cap) to
decode that step with. Points go from the most accurate (index 0, usually full depth) to the
cheapest; only Learn-then-Test certified points are used unless allow_uncertified=True
(`usable`), and a move skips the unusable ones.

`SLOController` keeps request latency under `budget_s`:

  pressure = max(p95 of the latencies reported in the last window_s, oldest_wait_s)

p95 is nearest-rank (the ceil(0.95 n)-th smallest). oldest_wait_s, the wait of the oldest
queued (not yet admitted) request, is a lower bound on that request's latency: it sees an
overload before any slow request finishes, and it is the only signal when none finishes.
With dwell = time since the last change (or since the first update):

  down: one point cheaper        if pressure > high x budget, dwell >= down_dwell_s and the
                                 backlog is not already draining (below)
  up:   one point more accurate  if pressure < low x budget, queue_len == 0, dwell >= the up
                                 dwell, and the point would not be overloaded (below)
  else stay.

[low, high] x budget is the hysteresis band. The dwells are asymmetric, shed load fast (a
missed SLO costs now) and recover slowly (a wrong recovery costs missed SLOs, staying cheap
only some quality): down_dwell_s = 0.5 s, up_dwell_s = 3 s >= window_s = 2 s, so an up move
is judged on latencies measured at the current point only.

Clearing the windows at a move. The latencies in the window were produced at the old point;
kept, they would re-trigger the same move as soon as the dwell allows, and one overload
would walk the controller to the cheapest point. Clearing is right but not enough: requests
that finish just after a move were admitted, and queued, before it, and oldest_wait_s keeps
growing while the backlog of the old point drains. So a further down move is held while
the queue has shrunk since the last down move and, at that rate, empties within budget_s.
A backlog that would take longer still moves one more point down to clear it (an overshoot
that costs quality for up_dwell_s, not the SLO).

Why latency alone cannot recover safely. At a cheap point with spare capacity the latency
is the service time whatever the load: it cannot say whether the more accurate point keeps
up, and a load between two points' capacities makes a latency-only controller oscillate
(up: a backlog builds; down: latency falls; up ...). Two guards:

* occupancy (the server passes it; preferred): the fraction of decode slots busy, averaged
  over the updates of the last occupancy_window_s = 10 s since the last move, and at least
  half of that (long: up moves are slow anyway, and a 3 s average of a Poisson load of 40/s
  is ~10% noisy; checked at every step, a 2-sigma dip would come). With B slots,
  arrival rate λ, n decode steps per request and step time s_i, Little's law gives
  occupancy = λ n s_i / B, so at point j it would be occupancy x s_j / s_i. Step time is
  taken proportional to mean_layers; with a fixed per-step overhead the true ratio is closer
  to 1, so the prediction is conservative. Up needs the prediction <= up_occupancy = 0.85.
* backoff: a down move within probe_s (default 30 x budget_s) of an up move marks a failed
  probe and multiplies the up dwell by up_backoff = 2 (up to max_up_dwell_s = 48 s); an up
  move that holds for probe_s resets it. A slight overload builds its backlog slowly (the
  oldest wait grows at 1 - capacity/λ per second), hence the long probe_s. Without
  occupancy this makes the oscillation between two points rarer (tests/test_slo.py),
  it cannot remove it.

`FixedController` has the same interface and never moves on load (baselines, benchmarks).

Live certification: `restrict(allowed, now_s)` (the drift monitor, act_jax/serve/monitor.py)
leaves usable only the points whose certificate is in force on live traffic. A controller
whose point lost its certificate moves at once to the nearest usable point more accurate
than it. The SLO controller then moves only among the usable points. A fixed controller goes
back to its own point once that point is certified again.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import numbers
from typing import Sequence

from act_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Point:
  """One operating point of a run, as measured on held-out data."""
  threshold: float
  max_layers: int | None
  certified: bool  # passed the Learn-then-Test certification (only these are used by default)
  mean_layers: float  # measured on held-out data (cost proxy: step time ~ mean_layers)
  quality: float | None = None  # e.g. consistency with full depth or accuracy, for reports
  label: str = ''

  @property
  def name(self) -> str:
    if self.label:
      return self.label
    cap = '' if self.max_layers is None else f',max_layers={self.max_layers}'
    return f'threshold={self.threshold:g}{cap}'


def _finite(x: float) -> bool:
  # numbers.Real: numpy scalars from the server count; bool is never a time.
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _count(x: int) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0


def p95(values: Sequence[float]) -> float:
  """Nearest-rank 95th percentile: the ceil(0.95 n)-th smallest value (n >= 1)."""
  s = sorted(values)
  return s[max(1, math.ceil(0.95 * len(s))) - 1]


class _Controller:
  """Points, the usable ones, the history of changes and the time spent at each point."""

  def __init__(self, points: Sequence[Point], allow_uncertified: bool, start: int,
               start_field: str):
    points = tuple(points)
    if not points:
      raise ConfigError('points=[]: need at least one operating point')
    for i, p in enumerate(points):
      if not isinstance(p, Point):
        raise ConfigError(f'points[{i}]={p!r}: must be an act_jax.serve.slo.Point')
      if not _finite(p.mean_layers) or p.mean_layers <= 0:
        raise ConfigError(f'points[{i}].mean_layers={p.mean_layers!r}: must be a positive '
                          f'number (the cost proxy)')
      # Index 0 is the most accurate: costs must not grow along the list.
      if i and p.mean_layers > points[i - 1].mean_layers + 1e-9:
        raise ConfigError(f'points[{i}].mean_layers={p.mean_layers:g}: must be <= '
                          f'points[{i - 1}].mean_layers={points[i - 1].mean_layers:g} (points go '
                          f'from the most accurate to the cheapest)')
    self.points = points
    self.allow_uncertified = bool(allow_uncertified)
    self.usable = tuple(p.certified or self.allow_uncertified for p in points)
    if not any(self.usable):
      raise ConfigError(f'points: none of the {len(points)} points is certified; certify '
                        f'them (calibrate) or pass allow_uncertified=True')
    if not (_count(start) and start < len(points)):
      raise ConfigError(f'{start_field}={start!r}: must be an index in [0, {len(points) - 1}]')
    if not self.usable[start]:
      raise ConfigError(f'{start_field}={start}: point {points[start].name} is uncertified, '
                        f'so unusable; pick a certified point or pass allow_uncertified=True')
    self._index = int(start)
    self.history: list[tuple[float, int]] = []  # (time, index) at every change
    self._now = -math.inf
    self._offline_usable = self.usable  # before any live restriction (restrict)
    self.home = self._index  # where a fixed controller returns once its point is usable

  def restrict(self, allowed: Sequence[bool], now_s: float) -> None:
    """Only points whose certificate is in force on live traffic stay usable
    (act_jax/serve/monitor.py: allowed[i]; index 0, full depth, always). If the point in use
    is not, move to the nearest usable one more accurate than it."""
    if len(allowed) != len(self.points):
      raise ConfigError(f'{len(allowed)} certificates for {len(self.points)} points')
    self.usable = tuple(u and (bool(a) or i == 0)
                        for i, (u, a) in enumerate(zip(self._offline_usable, allowed)))
    if not self.usable[0]:
      self.usable = (True,) + self.usable[1:]  # full depth is always certified
    j = self._target()
    if j != self._index:
      self._force(now_s, j)

  def _target(self) -> int:
    """Where the controller should be under the current usable set: its point, or the
    nearest usable one more accurate than it."""
    return self._nearest_usable(self._index)

  def _nearest_usable(self, j: int) -> int:
    while not self.usable[j]:
      j -= 1
    return j

  def _force(self, now_s: float, j: int) -> None:
    self._index = j
    self.history.append((now_s, j))

  @property
  def index(self) -> int:
    return self._index

  @property
  def point(self) -> Point:
    return self.points[self._index]

  def _tick(self, now_s: float, queue_len: int, oldest_wait_s: float) -> None:
    """Checks the inputs of one update; the first one opens the history."""
    if not _finite(now_s) or now_s < self._now:
      raise ConfigError(f'now_s={now_s!r}: must be finite and never decrease (last '
                        f'{self._now:g})')
    if not _count(queue_len):
      raise ConfigError(f'queue_len={queue_len!r}: must be an integer >= 0')
    if not _finite(oldest_wait_s) or oldest_wait_s < 0:
      raise ConfigError(f'oldest_wait_s={oldest_wait_s!r}: must be a finite number >= 0')
    self._now = now_s
    if not self.history:
      self.history.append((now_s, self._index))

  def time_at_points(self, end_s: float) -> list[float]:
    """Seconds spent at each point from the first update to end_s (len = number of points)."""
    out = [0.0] * len(self.points)
    if not self.history:
      return out
    if not _finite(end_s) or end_s < self.history[-1][0]:
      raise ConfigError(f'end_s={end_s!r}: must be >= the last change at '
                        f'{self.history[-1][0]:g}s')
    ends = [t for t, _ in self.history[1:]] + [end_s]
    for (t, i), e in zip(self.history, ends):
      out[i] += e - t
    return out


class FixedController(_Controller):
  """Always the same point (a baseline); the interface of SLOController."""

  def __init__(self, points: Sequence[Point], index: int = 0, *,
               allow_uncertified: bool = False):
    super().__init__(points, allow_uncertified, index, 'index')

  def _target(self) -> int:
    return self._nearest_usable(self.home)  # back home once it is certified again

  def update(self, now_s: float, *, queue_len: int, oldest_wait_s: float,
             completed: Sequence[float] = (), occupancy: float | None = None) -> int:
    del completed, occupancy  # a fixed point ignores the load
    self._tick(now_s, queue_len, oldest_wait_s)
    return self._index


class SLOController(_Controller):
  """Moves along the points to keep latency under budget_s (semantics: module docstring)."""

  def __init__(self, points: Sequence[Point], budget_s: float, *,
               allow_uncertified: bool = False, high: float = 0.8, low: float = 0.5,
               window_s: float = 2.0, down_dwell_s: float = 0.5, up_dwell_s: float = 3.0,
               start: int = 0, up_occupancy: float = 0.85, up_backoff: float = 2.0,
               max_up_dwell_s: float = 48.0, probe_s: float | None = None,
               occupancy_window_s: float = 10.0):
    super().__init__(points, allow_uncertified, start, 'start')
    if not _finite(budget_s) or budget_s <= 0:
      raise ConfigError(f'budget_s={budget_s!r}: must be a positive number of seconds')
    if not (_finite(high) and 0 < high <= 1):
      raise ConfigError(f'high={high!r}: must satisfy 0 < low < high <= 1 (fractions of the '
                        f'budget)')
    if not (_finite(low) and 0 < low < high):
      raise ConfigError(f'low={low!r}: must satisfy 0 < low < high={high:g} <= 1 (fractions '
                        f'of the budget)')
    for name, v in (('window_s', window_s), ('up_occupancy', up_occupancy),
                    ('occupancy_window_s', occupancy_window_s)):
      if not _finite(v) or v <= 0:
        raise ConfigError(f'{name}={v!r}: must be a positive number')
    for name, v in (('down_dwell_s', down_dwell_s), ('up_dwell_s', up_dwell_s)):
      if not _finite(v) or v < 0:
        raise ConfigError(f'{name}={v!r}: must be a number of seconds >= 0')
    if not _finite(up_backoff) or up_backoff < 1:
      raise ConfigError(f'up_backoff={up_backoff!r}: must be >= 1 (1 turns backoff off)')
    if not _finite(max_up_dwell_s) or max_up_dwell_s < up_dwell_s:
      raise ConfigError(f'max_up_dwell_s={max_up_dwell_s!r}: must be >= '
                        f'up_dwell_s={up_dwell_s:g}')
    probe_s = 30 * budget_s if probe_s is None else probe_s
    if not _finite(probe_s) or probe_s <= 0:
      raise ConfigError(f'probe_s={probe_s!r}: must be a positive number of seconds')
    self.budget_s = float(budget_s)
    self.high, self.low = float(high), float(low)
    self.window_s = float(window_s)
    self.down_dwell_s, self.up_dwell_s = float(down_dwell_s), float(up_dwell_s)
    self.up_occupancy, self.up_backoff = float(up_occupancy), float(up_backoff)
    self.max_up_dwell_s, self.probe_s = float(max_up_dwell_s), float(probe_s)
    self.occupancy_window_s = float(occupancy_window_s)
    self._lat: collections.deque[tuple[float, float]] = collections.deque()  # (reported, s)
    self._occ: collections.deque[tuple[float, float]] = collections.deque()  # (time, busy)
    self._occ_sum = 0.0
    self._queue_at_change = 0
    self._p95: float | None = None  # of _lat, recomputed only when _lat changes
    self._last_change = -math.inf
    self._last_move = 0  # +1 up (more accurate), -1 down, 0 none yet
    self._up_dwell = self.up_dwell_s  # current (backed off) up dwell
    self.pressure = 0.0  # of the last update, for logs

  @property
  def up_dwell_now(self) -> float:
    """The up dwell in force (up_dwell_s times the backoff of failed probes)."""
    return self._up_dwell

  def _force(self, now_s: float, j: int) -> None:
    # a move the monitor forced: the windows describe the old point, as after any move
    self._move(now_s, j, 0, 0)

  def _neighbour(self, step: int) -> int | None:
    """The next usable point in direction step (+1 cheaper, -1 more accurate), if any."""
    i = self._index + step
    while 0 <= i < len(self.points):
      if self.usable[i]:
        return i
      i += step
    return None

  def _fits(self, now_s: float, j: int) -> bool:
    """Whether point j would stay under up_occupancy at the measured load (True if unknown)."""
    if not self._occ:
      return True
    if now_s - self._occ[0][0] < 0.5 * self.occupancy_window_s:
      return False  # a few seconds of a Poisson load are too noisy to risk a probe on
    occ = self._occ_sum / len(self._occ)
    ratio = self.points[j].mean_layers / self.point.mean_layers
    return occ * ratio <= self.up_occupancy

  def _move(self, now_s: float, j: int, direction: int, queue_len: int) -> None:
    if direction < 0 and self._last_move > 0 and now_s - self._last_change < self.probe_s:
      # A failed probe: the more accurate point could not hold the load. Wait longer next time.
      self._up_dwell = min(self._up_dwell * self.up_backoff, self.max_up_dwell_s)
    self._index = j
    self._last_change = now_s
    self._last_move = direction
    self.history.append((now_s, j))
    # The windows describe the old point (module docstring).
    self._lat.clear()
    self._occ.clear()
    self._occ_sum = 0.0
    self._p95 = None
    self._queue_at_change = queue_len

  def _draining(self, now_s: float, queue_len: int) -> bool:
    """Whether the backlog left by the last (down) move empties within budget_s at the
    rate it has shrunk since: then the pressure is stale, and one more point down would
    overshoot."""
    q0 = self._queue_at_change
    if self._last_move >= 0 or queue_len >= q0:
      return False
    return queue_len * (now_s - self._last_change) / (q0 - queue_len) <= self.budget_s

  def update(self, now_s: float, *, queue_len: int, oldest_wait_s: float,
             completed: Sequence[float] = (), occupancy: float | None = None) -> int:
    """The point index to decode the next step with.

    completed: latencies (s) of the requests that finished since the last update.
    occupancy: fraction of decode slots busy since the last update (optional; guards up
    moves against a point that would be overloaded).
    """
    for lat in completed:
      if not _finite(lat) or lat < 0:
        raise ConfigError(f'completed latency {lat!r}: must be a finite number >= 0 (seconds)')
    if occupancy is not None and not (_finite(occupancy) and 0 <= occupancy <= 1):
      raise ConfigError(f'occupancy={occupancy!r}: must be a fraction in [0, 1]')
    if not self.history:
      self._last_change = now_s  # the dwell counts from the first update
    self._tick(now_s, queue_len, oldest_wait_s)
    for lat in completed:
      self._lat.append((now_s, float(lat)))
      self._p95 = None
    if occupancy is not None:
      self._occ.append((now_s, float(occupancy)))
      self._occ_sum += occupancy
    while self._lat and self._lat[0][0] < now_s - self.window_s:
      self._lat.popleft()
      self._p95 = None
    while self._occ and self._occ[0][0] < now_s - self.occupancy_window_s:
      self._occ_sum -= self._occ.popleft()[1]
    if self._p95 is None and self._lat:
      self._p95 = p95([lat for _, lat in self._lat])
    self.pressure = max(self._p95 if self._lat else 0.0, oldest_wait_s)

    dwell = now_s - self._last_change
    if self._last_move > 0 and dwell >= self.probe_s:
      self._up_dwell = self.up_dwell_s  # the last probe held: back to the quick recovery
    if (self.pressure > self.high * self.budget_s and dwell >= self.down_dwell_s
        and not self._draining(now_s, queue_len)):
      j = self._neighbour(+1)
      if j is not None:
        self._move(now_s, j, -1, queue_len)
    elif (self.pressure < self.low * self.budget_s and queue_len == 0
          and dwell >= self._up_dwell):
      j = self._neighbour(-1)
      if j is not None and self._fits(now_s, j):
        self._move(now_s, j, +1, queue_len)
    return self._index
