"""The scheduler: requests in, continuous batching over the engine's slots, records out.

`Scheduler` runs one round at a time (`iterate`): requests come from a trace through
`replay` (act_jax/serve/trace.py) or from HTTP clients through the server's engine thread
(act_jax/serve/server.py). A waiting request is admitted into a free slot at once, and a
request that has its bytes frees its slot for the next one at the next call (continuous
batching, Orca, Yu et al. 2022); `static_batches` is the baseline that waits for a full batch
and runs it to its longest request. Each round: every latency class's controller
(act_jax/serve/slo.py) picks its point from its queue and the latencies completed; one
batched prefill call advances every prompt not yet in the cache by at most one chunk; one
decode call advances every other row, each at its class's point. A request the engine cannot
serve is refused alone (`check_request`); the others are served. With a `shadow`
(act_jax/serve/monitor.py), a sampled finished request's prompt is scored at every point,
one per round, never while a request waits for a slot, and while rows decode only once half
the shadow queue's room is used (idle slots first); the time it takes raises the
occupancy the controllers see (the slots serve less while it runs). When the point in use
loses its certificate on the live window, every controller is restricted to the points
still in force (an 'alarm' event).
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from act_jax.data import PAD as PAD_ID
from act_jax.data import EOS as EOS_ID
from act_jax.serve.engine import Engine
from act_jax.spec import OperatingPoint


# ----------------------------------------------------------------------------- the scheduler
@dataclasses.dataclass
class Request:
  """A request with its prompt as token ids. cls: its latency class (one controller and
  budget per class; '' = the first class); point: an explicit operating point that
  overrides its class's; stop: byte strings that end the generation (not returned);
  `finish_reason` on its record says 'length' or 'stop'."""
  id: int
  arrival_s: float
  prompt: list[int]
  max_new: int
  domain: str = ''
  phase: str = ''
  cls: str = ''
  point: Optional[OperatingPoint] = None
  stop: tuple[bytes, ...] = ()
  eos: bool = False            # the model's end-of-sequence token ends the generation
  temperature: float = 0.0     # 0: greedy; else sampled, keyed by (seed, position)
  seed: int = 0


@dataclasses.dataclass
class Record:
  """What happened to one request (times in seconds from the start of the replay)."""
  id: int
  arrival_s: float
  domain: str
  phase: str
  prompt_len: int
  max_new: int
  cls: str = ''
  admitted_s: Optional[float] = None
  first_byte_s: Optional[float] = None
  done_s: Optional[float] = None
  error: Optional[str] = None
  tokens: list = dataclasses.field(default_factory=list)
  finish_reason: Optional[str] = None  # 'length' | 'stop' once done
  layers: list = dataclasses.field(default_factory=list)   # per decode step of this row
  experts: dict = dataclasses.field(default_factory=dict)  # first-choice expert -> count
  points: dict = dataclasses.field(default_factory=dict)   # point index -> decode steps
  fallbacks: int = 0  # (byte, MoE layer) pairs the generalist served (moe.fallback)
  events: list = dataclasses.field(default_factory=list)  # drift monitor events it triggered

  @property
  def latency_s(self) -> Optional[float]:
    return None if self.done_s is None else self.done_s - self.arrival_s

  def as_json(self, full_layers: int) -> dict:
    hist = collections.Counter(int(round(x)) for x in self.layers)
    top = sorted(self.experts.items(), key=lambda kv: -kv[1])[:3]
    out = {'id': self.id, 'arrival_s': self.arrival_s, 'domain': self.domain,
           'phase': self.phase, 'cls': self.cls, 'prompt_len': self.prompt_len,
           'max_new': self.max_new,
           'admitted_s': self.admitted_s, 'first_byte_s': self.first_byte_s,
           'done_s': self.done_s, 'latency_s': self.latency_s,
           'ttfb_s': None if self.first_byte_s is None else self.first_byte_s - self.arrival_s,
           'bytes': len(self.tokens),
           'mean_layers': float(np.mean(self.layers)) if self.layers else None,
           'exit_histogram': {str(k): hist[k] for k in sorted(hist)},
           'top_experts': [[int(e), int(c)] for e, c in top],
           'points': {str(k): v for k, v in sorted(self.points.items())},
           'full_layers': full_layers}
    if self.error:
      out['error'] = self.error
    if self.events:
      out['events'] = self.events
    return out


def check_request(r: Request, max_len: int) -> Optional[str]:
  """Why the server refuses r (one line), or None."""
  if not r.prompt:
    return 'empty prompt: a request needs at least one prompt byte'
  if r.max_new < 1:
    return f'max_new={r.max_new}: must be >= 1'
  if len(r.prompt) + r.max_new > max_len:
    return (f'prompt {len(r.prompt)} + max_new {r.max_new} bytes exceed the model context '
            f'{max_len} (model.max_len)')
  return None


class _FixedPoint:
  """The controller interface for one fixed point (quality re-decode, static batches)."""
  index = 0

  def update(self, now_s: float, **_) -> int:
    del now_s
    return 0


def _stopped(tokens: list, stop: tuple[bytes, ...], eos: bool) -> Optional[int]:
  """Where the generation ends early in `tokens`: the first stop string's start (tokens are
  bytes, specials map to none of them) or the end-of-sequence token; None if neither."""
  hits = []
  if eos and EOS_ID in tokens:
    hits.append(tokens.index(EOS_ID))
  if stop:
    text = bytes(t if t < 256 else 0 for t in tokens)
    hits += [i for i in (text.find(s) for s in stop) if i >= 0]
  return min(hits) if hits else None


class Scheduler:
  """Continuous batching over the engine's slots, one iteration at a time (module doc).

  classes: {name: controller}, one controller (a single class named '') or None (points[0]);
  a request of class c decodes at points[classes[c].update(...)] (its own operating point
  when it names one), so rows of one batch run at their classes' points. Admission takes
  the tightest class first (the order of `classes`), first come first served within it.
  Each `iterate` runs one prefill call (the next chunk of every prompt being prefilled,
  batched) and one decode call (every decoding row), so a decode step waits for at most one
  prefill chunk. on_bytes(record, new_bytes, done) is called as bytes are produced (the
  HTTP server streams them); `cancel` frees a request's slot (a client that went away)."""

  def __init__(self, engine: Engine, points: Sequence[OperatingPoint], classes: Any = None,
               *, static_batches: bool = False, log: Callable[[str], None] = lambda s: None,
               on_bytes: Optional[Callable[[Record, list, bool], None]] = None,
               clock: Callable[[], float] = time.perf_counter, prefill_batch: bool = True,
               shadow: Any = None):
    # one controller for everyone: requests keep their class in their records (summaries
    # report per class) but share its point
    self.one_class = classes is None or not isinstance(classes, dict)
    if self.one_class:
      classes = {'': classes or _FixedPoint()}
    self.engine, self.points, self.classes = engine, list(points), dict(classes)
    self.static_batches, self.log, self.on_bytes = static_batches, log, on_bytes
    self.clock = clock  # times the device calls (step_ms)
    # False: the baseline that prefills each admitted prompt in its own call(s) before the
    # next decode step (how serving worked before batched, chunked prefill)
    self.prefill_batch = prefill_batch
    self.shadow = shadow  # monitor.Shadow: live certification of the points (or None)
    self._shadow_s, self._last_round_t = 0.0, 0.0  # shadow seconds since the last round
    # prompt tokens prefilled since the last decode step: in all, and the most of one row
    self._prefilled_tokens = self._prefilled_row_max = 0
    slots = engine.slots
    self.active: list[Optional[Request]] = [None] * slots
    self.filled = [0] * slots                      # prompt tokens prefilled per slot
    self.tokens_B = np.full(slots, PAD_ID, np.int32)
    self.pos_B = np.zeros(slots, np.int32)
    self.queue: collections.deque = collections.deque()
    self.records: dict[int, Record] = {}
    self.steps: list[dict] = []
    self.completed: dict[str, list[float]] = {c: [] for c in self.classes}
    self.index = {c: 0 for c in self.classes}      # each class's point index

  @property
  def busy(self) -> bool:
    return (bool(self.queue) or any(a is not None for a in self.active)
            or bool(self.shadow is not None and self.shadow.pending))

  def class_of(self, r: Request) -> str:
    return r.cls if r.cls and not self.one_class else next(iter(self.classes))

  def submit(self, r: Request) -> Optional[str]:
    """Queues r, or refuses it alone (returns why, and records it)."""
    rec = Record(r.id, r.arrival_s, r.domain, r.phase, len(r.prompt), r.max_new, r.cls)
    self.records[r.id] = rec
    err = check_request(r, self.engine.max_len)
    if err is None and r.cls and not self.one_class and r.cls not in self.classes:
      err = f'latency class {r.cls!r} is unknown; known: {", ".join(self.classes)}'
    if err:
      rec.error = err
      self.log(f'request {r.id} refused: {err}')
      if self.on_bytes:
        self.on_bytes(rec, [], True)
      return err
    self.queue.append(r)
    return None

  def cancel(self, request_id: int, now_s: float) -> None:
    """Drops a queued request or frees its slot; its record says 'cancelled'."""
    for r in list(self.queue):
      if r.id == request_id:
        self.queue.remove(r)
    for s, r in enumerate(self.active):
      if r is not None and r.id == request_id:
        self._finish(s, now_s, completed=False)
    rec = self.records.get(request_id)
    if rec is not None and rec.done_s is None:
      rec.error = rec.error or 'cancelled'

  def _finish(self, slot: int, t: float, completed: bool = True) -> None:
    r = self.active[slot]
    rec = self.records[r.id]
    rec.done_s = t
    if completed:
      self.completed[self.class_of(r)].append(rec.latency_s)
      if self.shadow is not None:  # the point it spent most steps at, for the record
        point = max(rec.points, key=rec.points.get) if rec.points else -1
        self.shadow.offer(r.id, r.prompt, point if r.point is None else -1)
    self.active[slot] = None
    self.filled[slot] = 0
    self.tokens_B[slot], self.pos_B[slot] = PAD_ID, 0

  def _emit(self, slot: int, new: list, t: float) -> None:
    """Appends new bytes to the slot's record (cut at a stop string); finishes it when it
    has max_new bytes or stopped."""
    r = self.active[slot]
    rec = self.records[r.id]
    before = len(rec.tokens)
    rec.tokens.extend(int(x) for x in new)
    cut = _stopped(rec.tokens, r.stop, r.eos)
    done = cut is not None or len(rec.tokens) >= r.max_new
    if cut is not None:
      del rec.tokens[cut:]
    if done:
      rec.finish_reason = 'stop' if cut is not None else 'length'
      self._finish(slot, t)
    if self.on_bytes:
      self.on_bytes(rec, rec.tokens[before:], done)

  def _point_of(self, r: Request) -> OperatingPoint:
    return r.point if r.point is not None else self.points[self.index[self.class_of(r)]]

  def iterate(self, now: Callable[[], float], more_coming: bool = False) -> bool:
    """One round: controllers, admission, one prefill call, one decode call, and one shadow
    call when no request waits for a slot. False when there was nothing to run (static
    batches waiting to fill up, or idle)."""
    ran = self._serve_round(now, more_coming)
    sh = self.shadow
    # idle slots first: a shadow call while rows decode delays their next step, so it
    # waits for an idle engine unless half the pending room is used up (a busy server
    # must still score some traffic); never while a request waits for a slot
    if sh is not None and sh.pending and not self.queue and (
        all(a is None for a in self.active)
        or len(sh.pending) >= max(1, sh.options.max_pending // 2)):
      self._shadow_round(now())
      ran = True
    return ran

  def _shadow_round(self, t: float) -> None:
    """Scores one shadow prompt; applies the monitor's certificate to every controller."""
    sh = self.shadow
    rid = sh.pending[0][0]
    busy_s = sh.busy_s
    lost, gained = sh.run_one(t)
    self._shadow_s += sh.busy_s - busy_s
    if not lost and not gained:
      return
    before = dict(self.index)
    for c, ctl in self.classes.items():
      if hasattr(ctl, 'restrict'):
        ctl.restrict(sh.monitor.certified, t)
        self.index[c] = ctl.index
    in_use = set(before.values())
    names = lambda idx: [sh.labels[i] for i in idx]  # noqa: E731
    events = []
    if lost:
      events.append({'event': 'alarm' if in_use & set(lost) else 'decertified',
                     'points': names(lost)})
    if gained:
      events.append({'event': 'recertified', 'points': names(gained)})
    w = sh.monitor.window
    for e in events:
      e.update(t=t, request=rid, window_tokens=w.n,
               moved={c: [before[c], self.index[c]] for c in self.classes
                      if before[c] != self.index[c]})
      sh.events.append(e)
      if rid in self.records:
        self.records[rid].events.append(e)
      self.log(f'drift monitor {e["event"]} at {t:.1f}s ({w.n} window tokens): '
               f'{", ".join(e["points"])}' + ''.join(
                   f'; class {c or "(all)"} moves to {sh.labels[j]}'
                   for c, (_, j) in e['moved'].items()))

  def _serve_round(self, now: Callable[[], float], more_coming: bool) -> bool:
    engine, slots = self.engine, self.engine.slots
    t = now()
    busy = sum(a is not None for a in self.active)
    occupancy = busy / slots
    if self.shadow is not None:
      # shadow scoring takes engine time from decoding: the slots serve at (1 - s) of the
      # capacity, s its share of the time since the last round, so occupancy / (1 - s) is
      # what they would show without it (the controller's up moves account for it)
      elapsed = t - self._last_round_t
      share = min(self._shadow_s / elapsed, 0.999) if elapsed > 0 else 0.0
      occupancy = min(1.0, occupancy / (1.0 - share))
      self._shadow_s, self._last_round_t = 0.0, t
    for c, ctl in self.classes.items():
      waiting = [r for r in self.queue if self.class_of(r) == c]
      oldest = max(t - waiting[0].arrival_s, 0.0) if waiting else 0.0
      self.index[c] = ctl.update(t, queue_len=len(waiting), oldest_wait_s=oldest,
                                 completed=self.completed[c], occupancy=occupancy)
      self.completed[c] = []
    # Admission: continuous batching fills any free slot now; static batches wait until
    # the batch is empty and then for a full batch (or the end of the trace).
    can_admit = not self.static_batches or (busy == 0 and (len(self.queue) >= slots
                                                           or not more_coming))
    order = list(self.classes)
    while can_admit and self.queue and None in self.active:
      r = min(self.queue, key=lambda q: order.index(self.class_of(q)))  # FIFO within class
      self.queue.remove(r)
      slot = self.active.index(None)
      self.records[r.id].admitted_s = now()
      self.active[slot] = r
      self.filled[slot] = 0
    ran = False
    # Prefill: the next chunk of every prompt not yet in the cache, in one call.
    pre = [s for s in range(slots) if self.active[s] is not None
           and self.filled[s] < len(self.active[s].prompt)]
    calls = [pre] if self.prefill_batch else [[s] for s in pre]
    while calls and calls[0]:
      group = calls.pop(0)
      reqs = [self.active[s] for s in group]
      nxt, layers = engine.prefill_chunks(group, [r.prompt for r in reqs],
                                          [self.filled[s] for s in group],
                                          [self._point_of(r) for r in reqs],
                                          [r.temperature for r in reqs], [r.seed for r in reqs])
      t = now()
      for s, r, n, lay in zip(group, reqs, nxt, layers):
        self.filled[s] += len(lay)
        self._prefilled_tokens += len(lay)
        self._prefilled_row_max = max(self._prefilled_row_max, len(lay))
        if self.filled[s] == len(r.prompt):   # the prompt is in: its first byte
          self.records[r.id].first_byte_s = t
          self.tokens_B[s], self.pos_B[s] = int(n), len(r.prompt)
          self._emit(s, [int(n)], t)
        elif not self.prefill_batch:           # the baseline prefills whole prompts
          calls.insert(0, [s])
      ran = True
    run = [s for s in range(slots) if self.active[s] is not None
           and self.filled[s] == len(self.active[s].prompt)
           and len(self.records[self.active[s].id].tokens) > 0]
    if not run:
      return ran
    left_B = np.zeros(slots, np.int32)  # bytes each row still needs (0: idle slot)
    for s in run:
      left_B[s] = self.active[s].max_new - len(self.records[self.active[s].id].tokens)
    row_points = [self._point_of(self.active[s]) if s in run else self.points[0]
                  for s in range(slots)]
    same = all(p == row_points[run[0]] for p in (row_points[s] for s in run))
    t_step = self.clock()
    temps = [self.active[s].temperature if s in run else 0.0 for s in range(slots)]
    seeds = [self.active[s].seed if s in run else 0 for s in range(slots)]
    out = engine.step(self.tokens_B, self.pos_B, row_points[run[0]] if same else row_points,
                      left_B, temps, seeds)
    step_s = self.clock() - t_step
    t = now()  # bytes of a multi-step call are delivered when the call returns
    # bytes each row got: steps_per_call decode steps, or (exact mode) its accepted bytes
    counts = out['count']
    k = int(max(counts[s] for s in run))
    live = [[s for s in run if counts[s] > j] for j in range(k)]
    # one record per call: ms per decode step, and the slowest live row's layers per step
    slowest = [max(out['layers'][j][s] for s in live[j]) for j in range(k) if live[j]]
    # ms per decode step (exact mode: per self-speculative round)
    per = engine.steps_per_call if engine.mode == 'exact' else len(slowest)
    first = next(iter(self.classes))
    step = {'t': t, 'step_ms': 1e3 * step_s / per, 'steps': len(slowest),
            'active': len(run), 'queue': len(self.queue), 'point': self.index[first],
            # prompt tokens prefilled since the previous decode step (what this one waited
            # for), and the most of them one prompt advanced by (<= one chunk when batched)
            'prefill_tokens': self._prefilled_tokens,
            'prefill_row_tokens': self._prefilled_row_max,
            'max_layers': float(np.mean(slowest)),
            'mean_layers': float(np.mean([out['layers'][j][s] for j in range(k)
                                          for s in live[j]]))}
    self._prefilled_tokens = self._prefilled_row_max = 0
    if len(self.classes) > 1:
      step['points'] = dict(self.index)
    self.steps.append(step)
    if out['accepted'] is not None:  # exact mode: drafts accepted per round of live rows
      acc = out['accepted'][:, run]
      step['accepted'] = acc[acc >= 0].tolist()
    for s in run:
      r = self.active[s]
      rec = self.records[r.id]
      n = int(counts[s])
      idx = self.index[self.class_of(r)]
      for j in range(n):
        rec.layers.append(float(out['layers'][j][s]))
        rec.points[idx] = rec.points.get(idx, 0) + 1
        if out['top1'] is not None:
          for e in out['top1'][j][:, s]:
            if e >= 0:
              rec.experts[int(e)] = rec.experts.get(int(e), 0) + 1
        if out.get('fallback') is not None:
          rec.fallbacks += int(out['fallback'][j][s])
      self.tokens_B[s], self.pos_B[s] = out['next'][n - 1][s], self.pos_B[s] + n
      self._emit(s, [out['next'][j][s] for j in range(n)], t)
    return True


def replay(engine: Engine, requests: Sequence[Request], points: Sequence[OperatingPoint],
           controller: Any = None, *, realtime: bool = True, static_batches: bool = False,
           clock: Callable[[], float] = time.perf_counter,
           sleep: Callable[[float], None] = time.sleep,
           log: Callable[[str], None] = lambda s: None, prefill_batch: bool = True,
           shadow: Any = None) -> dict:
  """Serves `requests` (sorted by arrival) through the engine's slots; returns
  {'records': [Record], 'steps': [per decode step dict]}.

  realtime: requests arrive at their trace times on `clock` (idle time is slept through);
  else all are waiting at time 0 (quality re-decode). static_batches: the baseline that
  waits for a full batch of slots (or the end of the trace) and runs it to its longest
  request before admitting anyone else. controller: act_jax.serve.slo-style `.update(now_s,
  queue_len=, oldest_wait_s=, completed=)` -> index into points (None: points[0]), or
  {latency class: controller} for requests with classes (Scheduler). shadow: a
  monitor.Shadow that scores sampled requests in idle rounds (drift monitoring)."""
  sched = Scheduler(engine, points, controller, static_batches=static_batches, log=log,
                    clock=clock, prefill_batch=prefill_batch, shadow=shadow)
  pending = collections.deque(sorted(requests, key=lambda r: r.arrival_s))
  t0 = clock()
  now = lambda: clock() - t0 if realtime else 0.0  # noqa: E731
  while pending or sched.busy:
    t = now()
    while pending and (not realtime or pending[0].arrival_s <= t):
      sched.submit(pending.popleft())
    if not sched.busy or not sched.iterate(now, more_coming=bool(pending)):
      if pending:
        sleep(max(0.0, pending[0].arrival_s - now()))
  return {'records': [sched.records[r.id] for r in requests], 'steps': sched.steps}
