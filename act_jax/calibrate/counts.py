"""Per-point token counts of scored prompts, and the shadow log that carries them.

For a chain of K operating points (index 0: full depth) and n scored tokens (targets
x_{t+1}, predictions pred_k(t)), one `ShadowCounts` holds

  errors_k       = sum_t 1[pred_k(t) != pred_0(t)]               (--measure=consistency)
  broken_k       = sum_t 1[pred_0(t) = x_{t+1} != pred_k(t)]     (--measure=accuracy:
  fixed_k        = sum_t 1[pred_k(t) = x_{t+1} != pred_0(t)]      d = broken - fixed)
  layers_k       = layers run, summed;   full_correct = sum_t 1[pred_0(t) = x_{t+1}]

and everything reported follows from sums of them: agreement_k = 1 - errors_k / n,
accuracy_k = (full_correct + fixed_k - broken_k) / n, mean layers_k = layers_k / n.

The serve monitor (act_jax/serve/monitor.py) produces them and sums them over a sliding
window; `calibrate --from_serving` (certify.certify_from_serving) sums those of a serving
log. The log, SHADOW_LOG in the serving output folder: a header line ({'kind': 'header',
measure, tolerance, risk, points, ...}), then one line per scored request ({'kind':
'request', id, t, point, **ShadowCounts.as_json()}).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from act_jax.errors import ConfigError

SHADOW_LOG = 'shadow.jsonl'
MEASURES = ('consistency', 'accuracy')  # what a calibration's tolerance bounds


@dataclasses.dataclass
class ShadowCounts:
  """One scored prompt's (or a sum's) counts per point (index = the chain; 0 = full depth)."""
  n: int                  # scored tokens (prompt length - 1)
  errors: np.ndarray      # [K] tokens whose prediction differs from full depth
  broken: np.ndarray      # [K] full depth right, the point wrong
  fixed: np.ndarray       # [K] full depth wrong, the point right
  layers: np.ndarray      # [K] layers run, summed over the scored tokens
  full_correct: int       # tokens full depth predicts right
  confidence: float       # summed first-exit confidence (max softmax) at full depth
  dropped: Optional[float] = None  # MoE tokens over capacity, mean over layers (None: no MoE)

  def as_json(self) -> dict:
    return {'n': self.n, 'errors': self.errors.tolist(), 'broken': self.broken.tolist(),
            'fixed': self.fixed.tolist(), 'layers': self.layers.tolist(),
            'full_correct': self.full_correct, 'confidence': self.confidence,
            'dropped': self.dropped}

  @classmethod
  def from_json(cls, d: dict) -> 'ShadowCounts':
    arr = lambda k: np.asarray(d[k], np.int64)  # noqa: E731
    return cls(int(d['n']), arr('errors'), arr('broken'), arr('fixed'),
               np.asarray(d['layers'], np.float64), int(d['full_correct']),
               float(d['confidence']), d.get('dropped'))


def add(a: ShadowCounts, b: ShadowCounts, sign: int = 1) -> ShadowCounts:
  """a + b (sign=-1: a - b, a window's oldest request leaving)."""
  drop = None
  if a.dropped is not None and b.dropped is not None:  # token-weighted mean
    drop = (a.dropped * a.n + sign * b.dropped * b.n) / max(a.n + sign * b.n, 1)
  return ShadowCounts(a.n + sign * b.n, a.errors + sign * b.errors, a.broken + sign * b.broken,
                      a.fixed + sign * b.fixed, a.layers + sign * b.layers,
                      a.full_correct + sign * b.full_correct,
                      a.confidence + sign * b.confidence, drop)


def stats(c: ShadowCounts) -> dict:
  """Per point: agreement, accuracy, mean layers ([K] lists); full-depth accuracy, mean
  first-exit confidence, MoE drop rate."""
  n = max(c.n, 1)
  return {'tokens': c.n, 'agreement': (1.0 - c.errors / n).tolist(),
          'accuracy': ((c.full_correct + c.fixed - c.broken) / n).tolist(),
          'mean_layers': (c.layers / n).tolist(), 'full_accuracy': c.full_correct / n,
          'confidence': c.confidence / n, 'dropped': c.dropped}


def write_shadow_log(file: str, header: dict, rows: list[dict]) -> None:
  """The header, then one line per request, atomically (as run/directory.write_json): a
  kill mid-write leaves the previous log or none, never half of one."""
  tmp = file + '.tmp'
  with open(tmp, 'w') as f:
    f.write(json.dumps(dict(header, kind='header')) + '\n')
    for r in rows:
      f.write(json.dumps({'kind': 'request', **r}) + '\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, file)


def read_shadow_log(serving_dir: str) -> tuple[dict, list[ShadowCounts]]:
  """(header, one ShadowCounts per request) of DIR/SHADOW_LOG; ConfigError naming the file
  and line."""
  file = os.path.join(serving_dir, SHADOW_LOG)
  if not os.path.isfile(file):
    raise ConfigError(f'--from_serving={serving_dir}: no {SHADOW_LOG} there (serve with '
                      f'--shadow_fraction > 0 and --out writes it)')
  header, rows = None, []
  with open(file) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
        kind = d['kind']
        if kind == 'header':
          points = [(float(p['threshold']), p['max_layers']) for p in d['points']]
          header = d
        elif kind == 'request':
          k = len(header['points']) if header else -1
          if any(len(d[key]) != k for key in ('errors', 'broken', 'fixed', 'layers')) or \
              int(d['n']) < 1:
            raise ValueError('counts do not match the header\'s points')
          rows.append(ShadowCounts.from_json(d))
      except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f'{file}:{i}: not a shadow log line ({e}); serve writes this file')
  if header is None or not points:
    raise ConfigError(f'{file}: no header line; serve writes this file')
  if len(rows) < 2:
    raise ConfigError(f'{file}: {len(rows)} shadowed requests; need at least 2 (one to '
                      f'certify on, one to report on)')
  return header, rows


__all__ = ['MEASURES', 'SHADOW_LOG', 'ShadowCounts', 'add', 'read_shadow_log', 'stats',
           'write_shadow_log']
