"""Drift: shadow scoring of live requests at full depth, and Learn-then-Test on a window of
live traffic, so the certified operating point follows the traffic.

A certified point (act_jax/calibrate/ltt.py) is a promise about data like the calibration
half of the held-out split. On traffic that moves it can break silently. This module checks
it on the traffic itself.

Shadow scoring (`ShadowScorer`). A sampled finished request's prompt x_1..x_P is run
teacher-forced through `inference.forward_while`, once per point of the serving chain,
all in one batched call with one row per point (per-row thresholds [K, N]). Row 0 is full
depth. Rows are independent, so row k is exactly calibrate's forward at point k. For
t < P (target x_{t+1}):

  error_k(t)  = 1[pred_k(t) != pred_0(t)]                        consistency (calibrate's
                                                                 --measure=consistency)
  broken_k(t) = 1[pred_0(t) = x_{t+1} != pred_k(t)]              accuracy (--measure=accuracy:
  fixed_k(t)  = 1[pred_k(t) = x_{t+1} != pred_0(t)]              d = broken - fixed)

The served continuation is not scored: its next byte has no ground truth, and it was written
by the point under test. The inputs x_1..x_{P-1} are padded to a length bucket
(engine.prefill_buckets), so the scorer compiles once per bucket, at warm-up. PAD tokens run
no layer. In this teacher-forced forward they do count toward an MoE group's capacity, as in
calibrate's padded held-out windows: the counts equal calibrate's sweep on the same padded
window (tests/test_monitor.py).

The monitor (`Monitor`). It sums those counts (act_jax/calibrate/counts.py, as `calibrate
--from_serving` does) over a sliding window of the last W shadow
tokens; whole requests leave, the oldest first, while at least W tokens remain. On every
update it runs two one-sided tests per point, at RUN/calibration.json's measure, tolerance
and risk δ (accuracy: the tolerance relative to the window's full-depth accuracy, as
calibrate does):

  certify (H: risk > tol rejected): fixed-sequence Learn-then-Test over the chain of
      offline-certified points in their offline cost order (most accurate first). That order
      was fixed before any live data was seen, so the test is valid.
        consistency: binomial p_k = P(Binom(n, tol) <= errors_k)        (ltt.ltt_select)
        accuracy:    empirical-Bernstein p_k on d                       (ltt.ltt_select_accuracy)
  violate (H: risk <= tol rejected): the mirror test of each point.
        consistency: P(Binom(n, tol) >= errors_k) <= δ
        accuracy:    empirical-Bernstein p of "E[d] < tol" <= δ

  in force_k(t) = (in force_k(t-1) and not violated_k) or certified_k      (full depth: always)

Why two tests and not "in force = certified on the window". Calibrate picks the most
aggressive point that passes, so its point sits at the edge of the test. Re-tested on a fresh
window of the same traffic, it fails about as often as it passes: measured on the default
run with no drift, a 1,000-token window and the certify-only rule raised 2 alarms in 10 s.
A certificate therefore stands until live data contradicts it (a violation at level δ).
A point that has lost its certificate comes back only through a new certificate on the
window. Each test holds at level δ for its window. Re-testing as the window slides is
repeated testing, and no guarantee is uniform over time; the benchmark measures false alarms
on traffic without drift.

Rules, stated:
  * Until the window holds enough shadow tokens to certify anything
    (ltt.InsufficientCalibrationData), the monitor says 'insufficient'. Certificates in force
    then stand (at first: calibrate's), and only violations can remove them.
  * A point in use that loses its certificate raises an ALARM. Every controller is then
    restricted to the points in force (slo._Controller.restrict) and moves to the nearest one
    more accurate than its own: full depth when no other point is in force.
  * Points certified again on the window are RECERTIFIED and usable again. The SLO controller
    moves to them under its own rules; a fixed controller goes back to its home point.

Shadow work (`Shadow`). A fraction of finished requests is sampled (a hash of (seed, id),
reproducible), and their prompts wait in a bounded queue (the oldest are dropped past
`max_pending`, and counted). The scheduler runs one shadow call per round, never while a
request waits for a slot, and while rows are decoding only once half of `max_pending` is
used; otherwise it waits for an idle engine. So shadowing uses idle capacity first and
never delays admission. A busy server still scores: a decode step can then wait for one
shadow call, like one prefill chunk. Its cost is in the latencies the SLO controller sees
and in the occupancy it judges up moves on, and its seconds are counted (`busy_s`).

Dims: K points (rows), N depth steps, L bucketed prompt length.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.calibrate import counts as counts_lib
from act_jax.calibrate import ltt
from act_jax.calibrate.counts import MEASURES, ShadowCounts
from act_jax.data import PAD as PAD_ID
from act_jax.errors import ConfigError
from act_jax.infer import inference
from act_jax.serve.engine import prefill_buckets
from act_jax.spec import OperatingPoint, Spec


# ----------------------------------------------------------------------------- scoring
@functools.partial(jax.jit, static_argnums=(0,))
def _score(spec: Spec, variables, tokens_KL, threshold_KN, count):
  """Every row the same prompt at its own point: per row predictions and layers [K, L], the
  full-depth row's first-exit confidence [L], MoE drop fraction."""
  logits, aux = inference.forward_while(spec, variables, tokens_KL, threshold_KN)
  pred_KL = jnp.argmax(logits, -1).astype(jnp.int32)
  valid_L = jnp.arange(tokens_KL.shape[1]) < count  # real (not PAD) positions
  conf_L = (jax.nn.softmax(aux['step_logits'][0, 0].astype(jnp.float32), -1).max(-1)
            if 'step_logits' in aux else jnp.zeros(tokens_KL.shape[1]))
  dropped = jnp.mean(aux['moe']['dropped_frac']) if 'moe' in aux else jnp.float32(-1)
  return pred_KL, aux['layers'], jnp.sum(jnp.where(valid_L, conf_L, 0.0)), dropped


class ShadowScorer:
  """Scores prompts at every point of a chain (module docstring); `points`[0] is the
  reference (full depth)."""

  def __init__(self, spec: Spec, variables: Any, points: Sequence[OperatingPoint]):
    if not points or points[0].threshold < 1.0 or points[0].max_layers is not None:
      raise ConfigError('the shadow chain must start with full depth (the reference)')
    self.spec, self.variables, self.points = spec, variables, list(points)
    self.threshold_KN = jnp.asarray(np.stack([np.asarray(p.vector(spec), np.float32)
                                              for p in self.points]))
    self.buckets = prefill_buckets(spec.model.max_len)

  def score(self, prompt: Sequence[int]) -> Optional[ShadowCounts]:
    """The counts of one prompt (None when it has fewer than 2 bytes: nothing to score)."""
    p = [int(x) for x in prompt][:self.spec.model.max_len + 1]
    if len(p) < 2:
      return None
    n = len(p) - 1  # inputs x_1..x_{P-1}, targets x_2..x_P: calibrate's held-out windows
    width = next(b for b in self.buckets if b >= n)
    k = len(self.points)
    row = np.full(width, PAD_ID, np.int32)
    row[:n] = p[:-1]
    pred, layers, conf, dropped = _score(self.spec, self.variables,
                                         jnp.asarray(np.broadcast_to(row, (k, width))),
                                         self.threshold_KN, jnp.int32(n))
    pred, layers = np.asarray(pred)[:, :n], np.asarray(layers)[:, :n]
    target = np.asarray(p[1:])
    ok_KL = pred == target[None]
    full_ok = ok_KL[0]
    dropped = float(dropped)
    return ShadowCounts(n=n, errors=(pred != pred[:1]).sum(1).astype(np.int64),
                        broken=(full_ok[None] & ~ok_KL).sum(1).astype(np.int64),
                        fixed=(~full_ok[None] & ok_KL).sum(1).astype(np.int64),
                        layers=layers.sum(1).astype(np.float64),
                        full_correct=int(full_ok.sum()), confidence=float(conf),
                        dropped=None if dropped < 0 else dropped)

  def warmup(self) -> float:
    """Compiles every bucket (twice: the second call must hit the cache). Seconds."""
    t = time.perf_counter()
    for _ in range(2):
      for b in self.buckets:
        self.score([PAD_ID + 1] * (b + 1))
    return time.perf_counter() - t


def reference(scorer: ShadowScorer, prompts: Sequence[Sequence[int]]) -> dict:
  """The drift statistics on data the run was calibrated on (held-out windows): the window
  values are compared against these. {'agreement': [K], 'confidence', 'dropped'}."""
  total = None
  for p in prompts:
    c = scorer.score(p)
    if c is not None:
      total = c if total is None else counts_lib.add(total, c)
  if total is None:
    return {}
  return counts_lib.stats(total)


# ----------------------------------------------------------------------------- the monitor
def certify_counts(counts: ShadowCounts, chain: Sequence[int], measure: str, tolerance: float,
                   risk: float) -> dict:
  """Fixed-sequence Learn-then-Test of the points `chain` (indices into the counts, tested
  in that order) on summed shadow counts: {'valid': [len(chain)] bool, 'pvalues'}.
  measure='accuracy' takes `tolerance` relative to the counts' full-depth accuracy, as
  calibrate does. Raises ltt.InsufficientCalibrationData when n cannot certify anything."""
  if measure not in MEASURES:
    raise ConfigError(f'measure={measure!r}: allowed: {", ".join(MEASURES)}')
  if not chain:
    return {'valid': np.zeros(0, bool), 'pvalues': np.zeros(0)}
  idx = np.asarray(chain)
  sel = ltt.select_in_order(measure, counts.n, counts.errors[idx], counts.broken[idx],
                            counts.fixed[idx], counts.full_correct, tolerance, risk)
  return {'valid': np.asarray(sel['valid'], bool), 'pvalues': np.asarray(sel['pvalues'])}


def violations(counts: ShadowCounts, measure: str, tolerance: float, risk: float
               ) -> np.ndarray:
  """[K] bool: the window rejects "risk <= tolerance" for point k at level `risk` (the
  mirror of certify_counts; module docstring)."""
  n = counts.n
  out = np.zeros(len(counts.errors), bool)
  if n < 2:
    return out
  if measure == 'consistency':
    for k, e in enumerate(counts.errors):  # P(Binom(n, tol) >= e) = 1 - P(<= e - 1)
      out[k] = e > 0 and 1.0 - ltt.binomial_pvalue(n, int(e) - 1, tolerance) <= risk
    return out
  tol = tolerance * counts.full_correct / n
  for k, (b, f) in enumerate(zip(counts.broken, counts.fixed)):
    # the p-value of "E[d] < tol" is that of "E[-d] > -tol" for -d in [-1, 1]
    out[k] = ltt.bernstein_pvalue(n, -(b - f) / n, (b + f) / n, -tol) <= risk
  return out


class Monitor:
  """Certify and violate tests of the chain on a sliding window of shadow tokens (module
  docstring).

  offline_certified[i]: point i passed calibrate's test (index 0, full depth, always True).
  `certified` is the set in force: calibrate's, until live tests change it."""

  def __init__(self, offline_certified: Sequence[bool], measure: str, tolerance: float,
               risk: float, window_tokens: int):
    if measure not in MEASURES:
      raise ConfigError(f'measure={measure!r}: allowed: {", ".join(MEASURES)}')
    for name, v in (('tolerance', tolerance), ('risk', risk)):
      if not 0 < v < 1:
        raise ConfigError(f'{name}={v}: must be in (0, 1)')
    if not isinstance(window_tokens, int) or isinstance(window_tokens, bool) or \
        window_tokens < 1:
      raise ConfigError(f'--monitor_window={window_tokens!r}: a number of shadow tokens >= 1')
    self.offline = tuple(bool(c) for c in offline_certified)
    self.offline = (True,) + self.offline[1:]
    self.chain = [i for i, c in enumerate(self.offline) if c and i > 0]
    self.measure, self.tolerance, self.risk = measure, float(tolerance), float(risk)
    # accuracy: the tolerance is relative to the full-depth accuracy (<= 1), so this many is
    # needed even when full depth is always right
    need = (ltt.min_samples(tolerance, risk) if measure == 'consistency' else
            ltt.min_samples_accuracy(tolerance, risk))
    if self.chain and window_tokens < need:
      raise ConfigError(f'--monitor_window={window_tokens}: a window this small can never '
                        f'certify a point at {measure} tolerance {tolerance:g}, risk '
                        f'{risk:g}; it needs at least {need} shadow tokens')
    self.window_tokens = window_tokens
    self._window: collections.deque[ShadowCounts] = collections.deque()
    self._sum: Optional[ShadowCounts] = None
    self.certified = self.offline
    self.status = 'insufficient'  # until the window can certify: the offline set stands
    self.pvalues: Optional[np.ndarray] = None
    self.updates = 0

  @property
  def window(self) -> Optional[ShadowCounts]:
    return self._sum

  def add(self, counts: ShadowCounts) -> tuple[list[int], list[int]]:
    """Adds one request's counts, slides the window, retests. Returns (points that lost
    their certificate, points that regained it)."""
    self._window.append(counts)
    self._sum = counts if self._sum is None else counts_lib.add(self._sum, counts)
    while len(self._window) > 1 and self._sum.n - self._window[0].n >= self.window_tokens:
      self._sum = counts_lib.add(self._sum, self._window.popleft(), -1)
    self.updates += 1
    cert = [False] * len(self.offline)
    try:
      res = certify_counts(self._sum, self.chain, self.measure, self.tolerance, self.risk)
      self.status = 'live'
      self.pvalues = res['pvalues']
      for i, ok in zip(self.chain, res['valid']):
        cert[i] = bool(ok)
    except ltt.InsufficientCalibrationData:
      self.status = 'insufficient'  # too few tokens to certify: only violations count
    bad = violations(self._sum, self.measure, self.tolerance, self.risk)
    new = [i == 0 or (c and not bad[i]) or cert[i] for i, c in enumerate(self.certified)]
    old, self.certified = self.certified, tuple(new)
    lost = [i for i, (a, b) in enumerate(zip(old, new)) if a and not b]
    gained = [i for i, (a, b) in enumerate(zip(old, new)) if b and not a]
    return lost, gained

  def stats(self) -> dict:
    """The window's statistics (agreement, accuracy, layers per point; confidence, MoE drop)
    and the certificate in force."""
    out = {'status': self.status, 'certified': list(self.certified),
           'window_tokens': 0 if self._sum is None else self._sum.n}
    if self._sum is not None:
      out.update(counts_lib.stats(self._sum))
    return out


# ----------------------------------------------------------------------------- the shadow
@dataclasses.dataclass(frozen=True)
class ShadowOptions:
  """How serving shadows live traffic: the `serve` binary's --shadow_* / --monitor_* flags."""
  fraction: float = 0.0        # of finished requests scored at every point (0: off)
  window_tokens: int = 4096    # the monitor's sliding window, in shadow tokens
  seed: int = 0                # which requests are sampled
  max_pending: int = 64        # shadow prompts waiting; the oldest are dropped past it

  def validate(self) -> None:
    if isinstance(self.fraction, bool) or not 0.0 <= self.fraction <= 1.0:
      raise ConfigError(f'--shadow_fraction={self.fraction!r}: a fraction in [0, 1] of the '
                        f'requests (0: no shadowing)')
    if not isinstance(self.window_tokens, int) or isinstance(self.window_tokens, bool) or \
        self.window_tokens < 1:
      raise ConfigError(f'--monitor_window={self.window_tokens!r}: a number of shadow tokens '
                        f'>= 1')


class Shadow:
  """Sampling, the pending queue, the scorer and the monitor, for a scheduler. `labels`
  name the chain's points in events and logs."""

  def __init__(self, scorer: ShadowScorer, monitor: Monitor, options: ShadowOptions,
               labels: Sequence[str], log: Callable[[str], None] = lambda s: None):
    options.validate()
    self.scorer, self.monitor, self.options, self.labels = scorer, monitor, options, labels
    self.log = log
    self.pending: collections.deque = collections.deque()
    self.rows: list[dict] = []      # one per shadowed request (shadow.jsonl)
    self.events: list[dict] = []    # alarms and recertifications
    self.dropped = 0                # sampled prompts dropped from a full queue
    self.busy_s = 0.0               # seconds spent scoring
    self.timeline: list[dict] = []  # (t, window agreement per point, certified) per update
    self.reference: dict = {}       # the statistics on held-out data (serving.warm_shadow)

  def sampled(self, request_id: int) -> bool:
    f = self.options.fraction
    if f <= 0:
      return False
    # a reproducible hash of (seed, id) in [0, 1): Knuth's multiplicative constant
    h = ((int(request_id) + 1) * 2654435761 + self.options.seed * 40503) % (1 << 32)
    return h / float(1 << 32) < f

  def offer(self, request_id: int, prompt: Sequence[int], point: int) -> None:
    """A finished request: queued for scoring if sampled (point: the index it was served at,
    for the record)."""
    if not self.sampled(request_id):
      return
    if len(self.pending) >= self.options.max_pending:
      self.pending.popleft()
      self.dropped += 1
    self.pending.append((request_id, list(prompt), point))

  def run_one(self, now_s: float) -> Optional[tuple[list[int], list[int]]]:
    """Scores the oldest pending prompt and updates the monitor: (lost, gained) point
    indices, or None when nothing was pending."""
    if not self.pending:
      return None
    rid, prompt, point = self.pending.popleft()
    t = time.perf_counter()
    counts = self.scorer.score(prompt)
    self.busy_s += time.perf_counter() - t
    if counts is None:
      return [], []
    lost, gained = self.monitor.add(counts)
    self.rows.append({'id': rid, 't': now_s, 'point': point, **counts.as_json()})
    self.timeline.append({'t': now_s, 'status': self.monitor.status,
                          'agreement': counts_lib.stats(self.monitor.window)['agreement'],
                          'certified': list(self.monitor.certified)})
    return lost, gained

  def header(self) -> dict:
    """shadow.jsonl's first line: what `calibrate --from_serving` needs besides the rows."""
    return {'kind': 'header', 'measure': self.monitor.measure,
            'tolerance': self.monitor.tolerance, 'risk': self.monitor.risk,
            'window_tokens': self.monitor.window_tokens, 'fraction': self.options.fraction,
            'points': [{'threshold': p.threshold, 'max_layers': p.max_layers, 'label': lab,
                        'certified': c}
                       for p, lab, c in zip(self.scorer.points, self.labels,
                                            self.monitor.offline)]}

  def summary(self, engine_s: Optional[float] = None) -> dict:
    out = {'fraction': self.options.fraction, 'shadowed': len(self.rows),
           'dropped': self.dropped, 'pending': len(self.pending),
           'shadow_tokens': int(sum(r['n'] for r in self.rows)), 'busy_s': self.busy_s,
           'alarms': [e for e in self.events if e['event'] == 'alarm'],
           'events': self.events, 'window': self.monitor.stats(),
           'reference': self.reference, 'labels': list(self.labels),
           'timeline': self.timeline}
    if engine_s:
      out['busy_fraction'] = self.busy_s / engine_s
    return out


def write_jsonl(shadow: Shadow, path: str) -> None:
  """The shadow log (calibrate/counts.py): the header, then one line per shadowed request."""
  counts_lib.write_shadow_log(path, shadow.header(), shadow.rows)


__all__ = ['Monitor', 'Shadow', 'ShadowCounts', 'ShadowOptions', 'ShadowScorer',
           'certify_counts', 'reference', 'write_jsonl']
