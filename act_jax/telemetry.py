"""Telemetry: pure functions from model `aux` outputs to metrics, and metric writers.

Routing metrics follow the usual mixture-of-experts diagnostics (Shazeer et al. 2017,
"Outrageously Large Neural Networks"; Fedus et al. 2021, "Switch Transformers"):

  load_e        = Σ_t m_t · [idx_t = e]                       (tokens routed to expert e)
  imbalance     = max_e load_e / mean_e load_e                 (1.0 = perfectly balanced)
  entropy       = Σ_t m_t · (−Σ_e p_te log p_te) / Σ_t m_t     (nats; log E = uniform router)
  stability     = Σ_t m_t · [top1ᵃ_t ≠ top1ᵇ_t] / Σ_t m_t     (fraction of tokens that moved)
  Spearman ρ    = Pearson correlation of the average ranks of x and y.

`m_t` is an optional token mask (bool or float weights). A mask has the *token* shape, i.e.
the leading dimensions of the array it masks (e.g. [B, L] for top-k indices [B, L, k]).
Counts are float64 because a mask may carry fractional weights. A mean over zero valid
tokens is nan rather than 0, so an empty batch never looks like a perfect score.

Writers: `MetricsWriter` appends one JSON object per line to `workdir/metrics.jsonl` and
mirrors it to TensorBoard; `read_metrics` reads the file back, robust to kill -9 and to
restarts from an earlier checkpoint.
"""
from __future__ import annotations

import collections
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------- pure metric functions


def _align(x: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
  """Broadcast an array over trailing dims of `shape` (mask [B, L] or domain [B] -> tokens)."""
  a = np.asarray(x)
  if a.ndim > len(shape) or a.shape != tuple(shape[:a.ndim]):
    raise ValueError(f'{name} shape {a.shape} must equal the leading dims of {tuple(shape)}')
  return np.broadcast_to(a.reshape(a.shape + (1,) * (len(shape) - a.ndim)), shape)


def _weights(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
  if mask is None:
    return np.ones(shape, np.float64)
  return _align(np.asarray(mask, np.float64), shape, 'mask')


def _wmean(x: np.ndarray, w: np.ndarray) -> float:
  total = float(w.sum())
  return float((x * w).sum() / total) if total > 0 else math.nan


def expert_load(expert_idx: Any, num_experts: int, mask: Any = None) -> np.ndarray:
  """Tokens per expert, [E] float64; index -1 (dropped / no expert) is not counted."""
  idx = np.asarray(expert_idx).astype(np.int64)
  w = _weights(mask, idx.shape)
  if idx.size and idx.max() >= num_experts:
    raise ValueError(f'expert_idx holds {idx.max()}, but num_experts={num_experts}')
  keep = idx >= 0
  return np.bincount(idx[keep], weights=w[keep], minlength=num_experts).astype(np.float64)


def load_imbalance(load: Any) -> float:
  """max/mean of per-expert load; 1.0 is balanced. nan when no tokens were routed."""
  load = np.asarray(load, np.float64)
  mean = float(load.mean()) if load.size else 0.0
  return float(load.max() / mean) if mean > 0 else math.nan


def router_entropy(probs: Any, mask: Any = None) -> float:
  """Mean over tokens of −Σ p log p in nats; probs [..., E]. 0 log 0 is taken as 0."""
  p = np.asarray(probs, np.float64)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return _wmean(-plogp.sum(-1), _weights(mask, p.shape[:-1]))


def dropped_fraction(dropped: Any, mask: Any = None) -> float:
  """Fraction of (valid) token slots that were dropped, e.g. by expert capacity."""
  d = np.asarray(dropped, np.float64)
  return _wmean(d, _weights(mask, d.shape))


def routing_stability(top1_a: Any, top1_b: Any, mask: Any = None) -> float:
  """Fraction of tokens whose top-1 expert CHANGED between two checkpoints (0 = stable)."""
  a, b = np.asarray(top1_a), np.asarray(top1_b)
  if a.shape != b.shape:
    raise ValueError(f'top1_a shape {a.shape} != top1_b shape {b.shape}')
  return _wmean((a != b).astype(np.float64), _weights(mask, a.shape))


def domain_expert_usage(top1: Any, domain: Any, num_domains: int, num_experts: int,
                        mask: Any = None) -> np.ndarray:
  """[num_domains, E] fraction of each domain's tokens sent to each expert (rows sum to 1).

  top1 [B, L] (or any shape whose leading dim is B), domain [B]. Tokens with expert -1 are
  not counted; a domain with no valid tokens gets an all-zero row so the matrix stays
  plottable as a heatmap.
  """
  e = np.asarray(top1).astype(np.int64)
  d = _align(np.asarray(domain).astype(np.int64), e.shape, 'domain')
  w = _weights(mask, e.shape)
  keep = (e >= 0) & (w != 0)
  if keep.any() and (e[keep].max() >= num_experts or d[keep].min() < 0
                     or d[keep].max() >= num_domains):
    raise ValueError(f'top1/domain out of range for num_experts={num_experts}, '
                     f'num_domains={num_domains}')
  flat = d[keep] * num_experts + e[keep]
  counts = np.bincount(flat, weights=w[keep], minlength=num_domains * num_experts)
  counts = counts.reshape(num_domains, num_experts)
  rows = counts.sum(1, keepdims=True)
  return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks; tied values share the mean of the ranks they occupy."""
  order = np.argsort(x, kind='mergesort')
  xs = x[order]
  # Start index of each run of equal values, and the run each sorted item belongs to.
  new_run = np.concatenate([[True], xs[1:] != xs[:-1]])
  starts = np.flatnonzero(new_run)
  ends = np.concatenate([starts[1:], [len(x)]])
  run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(len(x), np.float64)
  ranks[order] = run_rank[np.cumsum(new_run) - 1]
  return ranks


def spearman(x: Any, y: Any) -> float:
  """Spearman rank correlation (average ranks for ties); nan if either input is constant."""
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f'x has {x.size} values but y has {y.size}')
  if x.size < 2:
    return math.nan
  rx, ry = _average_ranks(x), _average_ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
  return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def histogram(values: Any, bins: int | Sequence[float] = 10,
              mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """(counts float64, edges) as numpy.histogram: an int is the number of equal-width bins,
  a sequence gives explicit edges. Non-finite values are dropped; the mask weights counts."""
  v = np.asarray(values, np.float64)
  w = _weights(mask, v.shape)
  keep = np.isfinite(v) & (w != 0)
  counts, edges = np.histogram(v[keep], bins=bins, weights=w[keep])
  return counts.astype(np.float64), edges


def mean_by_bucket(values: Any, buckets: Any, mask: Any = None) -> dict[int, float]:
  """{bucket: mean value}, e.g. mean layers executed per difficulty bucket or domain.

  `buckets` may be per token (same shape as values) or per sequence (leading dims only,
  e.g. values [B, L], buckets [B]). Buckets without valid tokens are absent.
  """
  v = np.asarray(values, np.float64)
  b = _align(np.asarray(buckets).astype(np.int64), v.shape, 'buckets')
  w = _weights(mask, v.shape)
  out = {}
  for key in np.unique(b[w != 0]):
    sel = b == key
    out[int(key)] = _wmean(v[sel], w[sel])
  return out


def depth_histogram(layers: Any, num_layers: int, mask: Any = None) -> np.ndarray:
  """[num_layers + 1] fraction of (valid) tokens that executed exactly 0, 1, ..., num_layers
  layers (sums to 1; all zeros when no token is valid). Values are rounded to integers."""
  v = np.rint(np.asarray(layers, np.float64)).astype(np.int64)
  w = _weights(mask, v.shape)
  if v.size and (v.min() < 0 or v.max() > num_layers):
    raise ValueError(f'layers hold values outside [0, {num_layers}]')
  counts = np.bincount(v[w != 0].ravel(), weights=w[w != 0].ravel(), minlength=num_layers + 1)
  total = counts.sum()
  return counts / total if total > 0 else counts


def collapse(depth_hist: Mapping[int, float] | Sequence[float], num_steps: int,
             frac: float = 0.9) -> str:
  """'' or why the depth distribution collapsed: at least `frac` of the (scored) tokens ran
  the same number of steps. depth_hist maps steps run to the fraction of tokens (a dict, or
  a sequence indexed by steps, e.g. depth_histogram's output); fractions are renormalised,
  so counts work too. A policy that adapts puts mass on several depths; the reported failure
  of Universal Transformer + ACT runs is ~1 step everywhere, and a PonderNet cell that never
  learns can halt every input at one fixed middle step, which is just as non-adaptive.

  Step 1 (k <= 1) and the maximum (k >= num_steps) keep their own messages and take
  precedence; any other depth d with mass >= frac reads 'all at step d'."""
  hist = dict(depth_hist) if isinstance(depth_hist, Mapping) else dict(enumerate(depth_hist))
  total = float(sum(hist.values()))
  if total <= 0:
    return ''
  early = sum(v for k, v in hist.items() if k <= 1) / total
  late = sum(v for k, v in hist.items() if k >= num_steps) / total
  if early >= frac:
    return f'all at step 1 ({early:.0%} of tokens)'
  if late >= frac:
    return f'all at the maximum {num_steps} ({late:.0%} of tokens)'
  # Why a separate pass: a constant depth strictly between 1 and the maximum is as
  # non-adaptive as either end (the PonderNet cell at 96 entries halted every row at 6).
  for k, v in sorted(hist.items()):
    if 1 < k < num_steps and v / total >= frac:
      return f'all at step {k} ({v / total:.0%} of tokens)'
  return ''


def routing_stability_per_layer(top1_a: Any, top1_b: Any, mask: Any = None) -> np.ndarray:
  """[layers] routing_stability of each MoE layer for top1 [layers, B, L].

  Only tokens routed in BOTH checkpoints (expert >= 0) count: a token that halted before a
  layer in one checkpoint has no expert there, which is a depth change, not a routing change.
  """
  a, b = np.asarray(top1_a), np.asarray(top1_b)
  if a.shape != b.shape or a.ndim < 2:
    raise ValueError(f'top1_a {a.shape} and top1_b {b.shape}: need equal [layers, ...] shapes')
  w = _weights(mask, a.shape[1:])
  return np.array([routing_stability(a[i], b[i], w * ((a[i] >= 0) & (b[i] >= 0)))
                   for i in range(a.shape[0])], np.float64)


def aux_histograms(aux: Mapping[str, Any], weights: Any = None,
                   prefix: str = '') -> dict[str, np.ndarray]:
  """Per-token value arrays for `MetricsWriter.write_histograms`, from a model aux (numpy or
  device arrays; call jax.device_get first inside a jit-free host loop).

  Reads aux['layers'] [B,L], optionally aux['exit_step'] [B,L] and aux['moe'] with
  'top1_expert' [layers,B,L] and 'load' [layers,E] (tokens may also come flattened:
  layers [1,T] or [T] with top1_expert [layers,T]). Tokens with weight 0 (default:
  ~aux['valid'] when present) are left out. Returns {prefix + name: 1-D array}:
    layers_executed             layers each valid token ran
    exit_step                   0-based depth step at which each valid token stopped
    moe/top1_expert/layer_{i}   expert id of each routed token in MoE layer i
    moe/load_share              per-(layer, expert) share of that layer's routed load
  """
  layers = np.asarray(aux['layers'], np.float64)
  if weights is None and 'valid' in aux:
    weights = np.asarray(aux['valid'])
  keep = _weights(weights, layers.shape) > 0
  out = {f'{prefix}layers_executed': layers[keep]}
  if 'exit_step' in aux:
    out[f'{prefix}exit_step'] = np.asarray(aux['exit_step'], np.float64)[keep]
  moe = aux.get('moe')
  if moe:
    top1 = np.asarray(moe['top1_expert'])
    for i in range(top1.shape[0]):
      t = top1[i]
      if t.size != keep.size:
        raise ValueError(f'top1_expert[{i}] has {t.size} tokens, layers has {keep.size}')
      k = keep.reshape(t.shape)  # [B, L] vs flattened [T] token layouts both work
      out[f'{prefix}moe/top1_expert/layer_{i}'] = t[k & (t >= 0)].astype(np.float64)
    load = np.asarray(moe['load'], np.float64)
    rows = load.sum(-1, keepdims=True)
    out[f'{prefix}moe/load_share'] = np.divide(load, rows, out=np.full_like(load, np.nan),
                                               where=rows > 0).ravel()
  return out


def _as_scalar(v: Any) -> float | None:
  if isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_)):
    return float(v)
  if getattr(v, 'shape', None) == () and hasattr(v, 'dtype'):  # 0-d numpy / jax array
    a = np.asarray(v)
    if a.dtype.kind in 'biuf':
      return float(a)
  return None


def flatten_metrics(tree: Mapping[str, Any], prefix: str = '') -> dict[str, float]:
  """Flatten nested dicts of scalars into {'a/b/c': float}; non-scalars are skipped."""
  out: dict[str, float] = {}
  for k, v in tree.items():
    key = f'{prefix}/{k}' if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten_metrics(v, key))
    else:
      f = _as_scalar(v)
      if f is not None:
        out[key] = f
  return out


# ------------------------------------------------------------------------------ writers

_RESERVED = ('step', 'split')


def _end_with_newline(path: Path) -> None:
  """After a kill -9 mid-line, start appends on a fresh line so no new record is glued
  onto the truncated one (read_metrics skips the fragment)."""
  if path.exists() and path.stat().st_size > 0:
    with open(path, 'rb+') as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        f.write(b'\n')


class MetricsWriter:
  """Appends {"step", "split", **scalars} lines to workdir/metrics.jsonl and writes
  TensorBoard events to workdir/tb. With enabled=False (non-zero host) all methods no-op."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.workdir = Path(workdir)
    self.enabled = bool(enabled)
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    path = self.workdir / 'metrics.jsonl'
    _end_with_newline(path)
    self._file = open(path, 'a', encoding='utf-8')  # append: a resumed run keeps history
    from tensorboardX import SummaryWriter  # imported lazily: the metric functions need no TB
    self._tb = SummaryWriter(logdir=str(self.workdir / 'tb'))

  def write_scalars(self, step: int, scalars: Mapping[str, Any], split: str = 'train') -> None:
    """One JSONL line (flushed at once) plus TensorBoard scalars tagged '{split}/{name}'.

    Nested dicts are flattened to 'a/b' names; non-scalars are skipped; nan/inf -> null.
    Log everything for one (split, step) in one call: read_metrics keeps only the last.
    """
    if not self.enabled:
      return
    flat = flatten_metrics(scalars)
    for name in _RESERVED:
      if name in flat:
        raise ValueError(f'scalar name {name!r} is reserved by the metrics.jsonl format')
    record: dict[str, Any] = {'step': int(step), 'split': str(split)}
    record.update({k: (v if math.isfinite(v) else None) for k, v in flat.items()})
    self._file.write(json.dumps(record, allow_nan=False) + '\n')
    self._file.flush()  # a killed run loses nothing already logged
    for k, v in flat.items():
      self._tb.add_scalar(f'{split}/{k}', v, int(step))

  def write_histograms(self, step: int, arrays: Mapping[str, Any]) -> None:
    """TensorBoard histograms only; non-finite entries are dropped, empty arrays skipped."""
    if not self.enabled:
      return
    for name, arr in arrays.items():
      v = np.asarray(arr, np.float64).ravel()
      v = v[np.isfinite(v)]
      if v.size:
        self._tb.add_histogram(str(name), v, int(step))

  def flush(self) -> None:
    if not self.enabled:
      return
    self._file.flush()
    self._tb.flush()

  def close(self) -> None:
    if not self.enabled or self._file is None:
      return
    self._file.close()
    self._tb.close()
    self._file = self._tb = None

  def __enter__(self) -> 'MetricsWriter':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike, split: str | None = None) -> list[dict]:
  """Records from workdir/metrics.jsonl, sorted by step; null is read back as nan.

  Unparseable lines (a line cut short by kill -9) are skipped. After a restart from an
  earlier checkpoint a split's step goes back to s: records of that split with step >= s
  logged before the restart belong to the abandoned run and are dropped, so for every
  (split, step) the LAST record wins.
  """
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  by_split: dict[str, dict[int, dict]] = collections.defaultdict(dict)
  last_step: dict[str, int] = {}  # after each record, the newest step is also the largest
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      try:
        rec = json.loads(line)
        step, rec_split = int(rec['step']), str(rec['split'])
      except (ValueError, TypeError, KeyError):
        continue
      if split is not None and rec_split != split:
        continue
      seen = by_split[rec_split]
      if step < last_step.get(rec_split, step):
        for s in [s for s in seen if s >= step]:
          del seen[s]
      last_step[rec_split] = step
      seen.pop(step, None)
      seen[step] = {k: (math.nan if v is None else v) for k, v in rec.items()}
  records = [r for seen in by_split.values() for r in seen.values()]
  return sorted(records, key=lambda r: r['step'])  # stable: same-step splits keep order


# ----------------------------------------------------------------------------- progress


def format_eta(seconds: float) -> str:
  """'45s', '2m03s' or '1h02m'; '?' when unknown (nan/inf)."""
  if seconds is None or not math.isfinite(seconds):
    return '?'
  s = max(0, int(round(seconds)))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s // 3600}h{(s % 3600) // 60:02d}m'


class Progress:
  """Progress line with a rate over the last `window` updates, so the ETA follows speed
  changes (compilation, eval pauses) and a resumed run does not count steps it skipped."""

  def __init__(self, total: int, start: int = 0, *, window: int = 20,
               clock: Callable[[], float] = time.monotonic):
    if total <= 0:
      raise ValueError(f'total={total}: must be positive')
    self.total = int(total)
    self._clock = clock
    self._samples = collections.deque([(clock(), int(start))], maxlen=max(2, window))

  @property
  def rate(self) -> float:
    """Steps per second over the window; nan until time and steps have advanced."""
    (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
    return (d1 - d0) / (t1 - t0) if t1 > t0 and d1 > d0 else math.nan

  def update(self, done: int) -> str:
    self._samples.append((self._clock(), int(done)))
    rate = self.rate
    eta = (self.total - done) / rate if rate > 0 else math.nan
    rate_s = '?' if not rate > 0 else (f'{rate:.1f}' if rate >= 1 else f'{rate:.2g}')
    pct = int(100 * done / self.total)
    return f'step {done}/{self.total} ({pct}%) {rate_s} it/s ETA {format_eta(eta)}'
