"""The scheduler: requests in, continuous batching over the engine's slots, records out.

Requests arrive on a trace (act_jax/serve/trace.py). A waiting request is admitted into a free
slot at once, and a request that has its bytes frees its slot for the next one at the next
call (continuous batching, Orca, Yu et al. 2022); `static_batches` is the baseline that waits
for a full batch and runs it to its longest request. Before every call a controller
(act_jax/serve/slo.py) picks the operating point from the queue and the latencies completed.
A request the engine cannot serve is refused alone (`check_request`); the others are served.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from act_jax.data import PAD as PAD_ID
from act_jax.serve.engine import Engine
from act_jax.spec import OperatingPoint


# ----------------------------------------------------------------------------- the scheduler
@dataclasses.dataclass
class Request:
  """A trace request with its prompt as token ids."""
  id: int
  arrival_s: float
  prompt: list[int]
  max_new: int
  domain: str = ''
  phase: str = ''


@dataclasses.dataclass
class Record:
  """What happened to one request (times in seconds from the start of the replay)."""
  id: int
  arrival_s: float
  domain: str
  phase: str
  prompt_len: int
  max_new: int
  admitted_s: Optional[float] = None
  first_byte_s: Optional[float] = None
  done_s: Optional[float] = None
  error: Optional[str] = None
  tokens: list = dataclasses.field(default_factory=list)
  layers: list = dataclasses.field(default_factory=list)   # per decode step of this row
  experts: dict = dataclasses.field(default_factory=dict)  # first-choice expert -> count
  points: dict = dataclasses.field(default_factory=dict)   # point index -> decode steps

  @property
  def latency_s(self) -> Optional[float]:
    return None if self.done_s is None else self.done_s - self.arrival_s

  def as_json(self, full_layers: int) -> dict:
    hist = collections.Counter(int(round(x)) for x in self.layers)
    top = sorted(self.experts.items(), key=lambda kv: -kv[1])[:3]
    out = {'id': self.id, 'arrival_s': self.arrival_s, 'domain': self.domain,
           'phase': self.phase, 'prompt_len': self.prompt_len, 'max_new': self.max_new,
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


def replay(engine: Engine, requests: Sequence[Request], points: Sequence[OperatingPoint],
           controller: Any = None, *, realtime: bool = True, static_batches: bool = False,
           clock: Callable[[], float] = time.perf_counter,
           sleep: Callable[[float], None] = time.sleep,
           log: Callable[[str], None] = lambda s: None) -> dict:
  """Serves `requests` (sorted by arrival) through the engine's slots; returns
  {'records': [Record], 'steps': [per decode step dict]}.

  realtime: requests arrive at their trace times on `clock` (idle time is slept through);
  else all are waiting at time 0 (quality re-decode). static_batches: the baseline that
  waits for a full batch of slots (or the end of the trace) and runs it to its longest
  request before admitting anyone else. controller: act_jax.serve.slo-style `.update(now_s,
  queue_len=, oldest_wait_s=, completed=)` -> index into points (None: points[0])."""
  controller = controller or _FixedPoint()
  slots = engine.slots
  pending = collections.deque(sorted(requests, key=lambda r: r.arrival_s))
  queue: collections.deque = collections.deque()
  records = {r.id: Record(r.id, r.arrival_s, r.domain, r.phase, len(r.prompt), r.max_new)
             for r in requests}
  active: list[Optional[Request]] = [None] * slots
  tokens_B = np.full(slots, PAD_ID, np.int32)
  pos_B = np.zeros(slots, np.int32)
  steps: list[dict] = []
  completed: list[float] = []
  t0 = clock()
  now = lambda: clock() - t0 if realtime else 0.0  # noqa: E731

  def finish(slot: int, t: float) -> None:
    rec = records[active[slot].id]
    rec.done_s = t
    completed.append(rec.latency_s)
    active[slot] = None
    tokens_B[slot], pos_B[slot] = PAD_ID, 0

  while pending or queue or any(a is not None for a in active):
    t = now()
    while pending and (not realtime or pending[0].arrival_s <= t):
      r = pending.popleft()
      err = check_request(r, engine.max_len)
      if err:  # refused alone; the others are served
        records[r.id].error = err
        log(f'request {r.id} refused: {err}')
      else:
        queue.append(r)
    busy = sum(a is not None for a in active)
    if not busy and not queue:
      if pending:
        sleep(max(0.0, pending[0].arrival_s - now()))
      continue
    oldest = (t - queue[0].arrival_s) if queue and realtime else 0.0
    index = controller.update(t, queue_len=len(queue), oldest_wait_s=max(oldest, 0.0),
                              completed=completed, occupancy=busy / slots)
    completed = []
    point = points[index]
    # Admission: continuous batching fills any free slot now; static batches wait until
    # the batch is empty and then for a full batch (or the end of the trace).
    can_admit = not static_batches or (busy == 0 and (len(queue) >= slots or not pending))
    while can_admit and queue and None in active:
      slot = active.index(None)
      r = queue.popleft()
      rec = records[r.id]
      rec.admitted_s = now()
      first, _ = engine.prefill(slot, r.prompt, point)
      rec.first_byte_s = now()
      rec.tokens.append(first)
      active[slot] = r
      tokens_B[slot], pos_B[slot] = first, len(r.prompt)
      if r.max_new == 1:
        finish(slot, rec.first_byte_s)
    run = [s for s in range(slots) if active[s] is not None]
    if not run:  # static batches waiting to fill up
      if pending:
        sleep(max(0.0, pending[0].arrival_s - now()))
      continue
    left_B = np.zeros(slots, np.int32)  # bytes each row still needs (0: idle slot)
    for s in run:
      left_B[s] = active[s].max_new - len(records[active[s].id].tokens)
    t_step = clock()
    out = engine.step(tokens_B, pos_B, point, left_B)
    step_s = clock() - t_step
    t = now()  # bytes of a multi-step call are delivered when the call returns
    # bytes each row got: steps_per_call decode steps, or (exact mode) its accepted bytes
    counts = out['count']
    k = int(max(counts[s] for s in run))
    live = [[s for s in run if counts[s] > j] for j in range(k)]
    # one record per call: ms per decode step, and the slowest live row's layers per step
    slowest = [max(out['layers'][j][s] for s in live[j]) for j in range(k) if live[j]]
    # ms per decode step (exact mode: per self-speculative round)
    per = engine.steps_per_call if engine.mode == 'exact' else len(slowest)
    steps.append({'t': t, 'step_ms': 1e3 * step_s / per, 'steps': len(slowest),
                  'active': len(run), 'queue': len(queue), 'point': index,
                  'max_layers': float(np.mean(slowest)),
                  'mean_layers': float(np.mean([out['layers'][j][s] for j in range(k)
                                                for s in live[j]]))})
    if out['accepted'] is not None:  # exact mode: drafts accepted per round of live rows
      acc = out['accepted'][:, run]
      steps[-1]['accepted'] = acc[acc >= 0].tolist()
    for s in run:
      r = active[s]
      rec = records[r.id]
      for j in range(int(counts[s])):
        rec.tokens.append(int(out['next'][j][s]))
        rec.layers.append(float(out['layers'][j][s]))
        rec.points[index] = rec.points.get(index, 0) + 1
        if out['top1'] is not None:
          for e in out['top1'][j][:, s]:
            if e >= 0:
              rec.experts[int(e)] = rec.experts.get(int(e), 0) + 1
      n = int(counts[s])
      tokens_B[s], pos_B[s] = out['next'][n - 1][s], pos_B[s] + n
      if len(rec.tokens) == r.max_new:
        finish(s, t)
  return {'records': [records[r.id] for r in requests], 'steps': steps}
