"""Side-by-side comparison of training runs (halting policy / router variants).

`compare_runs(workdirs, out=None)` reads each run's config.json and metrics.jsonl (no model
is loaded, so it is instant) and returns a text table plus one row dict per run:

  run, halting, router, eval_loss, eval_accuracy, layers_mean, layers_full, tokens_per_sec,
  dropped_frac, load_imbalance, fallback_frac (moe.fallback runs: share sent to the generalist)

Final eval metrics come from the last eval record; tokens/s is the median of the last three
train records, never the first one (it includes compilation). MoE columns prefer eval
records, falling back to train. A value a run does not have is shown as '-'. With `out`, a
PNG is written: quality vs mean layers executed (scatter) and per-run bars.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from act_jax import telemetry
from act_jax.errors import ConfigError
from act_jax.run import directory as run_lib
from act_jax.viz.report import _save, plt

COLUMNS = (('run', 'run'), ('halting', 'halting'), ('router', 'router'),
           ('eval_loss', 'eval loss'), ('eval_accuracy', 'eval acc'),
           ('layers', 'layers/full'), ('tokens_per_sec', 'tok/s'),
           ('dropped_frac', 'dropped'), ('load_imbalance', 'imbalance'),
           ('fallback_frac', 'fallback'))


def _last(records: Sequence[dict], key: str) -> float | None:
  for r in reversed(records):
    v = r.get(key)
    if v is not None and math.isfinite(float(v)):
      return float(v)
  return None


def _names(workdirs: Sequence[str]) -> list[str]:
  """Basenames, or longer path tails where basenames collide (runs/a/x vs runs/b/x)."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  for depth in range(1, max(len(p) for p in parts) + 1):
    names = [os.sep.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return [os.path.normpath(w) for w in workdirs]


def run_row(workdir: str, name: str | None = None) -> dict[str, Any]:
  """One run's summary row; raises ConfigError naming the path when it has no metrics."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise ConfigError(f'no metrics file at {path}: {workdir!r} is not a training workdir')
  records = telemetry.read_metrics(workdir)
  train = [r for r in records if r['split'] == 'train']
  evals = [r for r in records if r['split'] == 'eval']
  config = run_lib.read_json(os.path.join(workdir, run_lib.CONFIG)) or {}
  timed = train[1:] if len(train) > 1 else train  # the first record includes compilation
  tps = [r['tokens_per_sec'] for r in timed[-3:] if r.get('tokens_per_sec') is not None
         and math.isfinite(r['tokens_per_sec'])]
  full = _last(evals, 'layers_full') or config.get('model', {}).get('num_layers')
  row = {
      'run': name or os.path.basename(os.path.normpath(workdir)),
      'workdir': workdir,
      'halting': config.get('halting', {}).get('name'),
      'router': config.get('moe', {}).get('router'),
      'eval_loss': _last(evals, 'loss'),
      'eval_accuracy': _last(evals, 'accuracy'),
      'layers_mean': _last(evals, 'layers_mean'),
      'layers_full': None if full is None else float(full),
      'tokens_per_sec': float(np.median(tps)) if tps else None,
      'step': int(records[-1]['step']) if records else None,
  }
  for key in ('dropped_frac', 'load_imbalance', 'fallback_frac'):
    v = _last(evals, f'moe/{key}')
    row[key] = v if v is not None else _last(train, f'moe/{key}')
  if config.get('moe', {}).get('fallback', 'none') == 'none':
    row['fallback_frac'] = None  # no generalist fallback: '-', not 0 %
  return row


def _cell(row: dict, key: str) -> str:
  if key == 'layers':
    m, f = row.get('layers_mean'), row.get('layers_full')
    return '-' if m is None else (f'{m:.2f}/{f:g}' if f is not None else f'{m:.2f}/-')
  v = row.get(key)
  if v is None:
    return '-'
  if isinstance(v, str):
    return v
  if key == 'tokens_per_sec':
    return f'{v:,.0f}'
  if key in ('dropped_frac', 'fallback_frac'):
    return f'{100 * v:.1f}%'
  return f'{v:.4f}' if key.startswith('eval_') else f'{v:.3f}'


def format_table(rows: Sequence[dict]) -> str:
  """Fixed-width text table, one line per run."""
  cells = [[title for _, title in COLUMNS]] + [[_cell(r, k) for k, _ in COLUMNS] for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
  lines = ['  '.join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(line, widths))).rstrip() for line in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def plot_compare(rows: Sequence[dict], path: str) -> str:
  """Scatter eval accuracy vs mean layers executed, plus bars of eval loss and layers."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  names = [r['run'] for r in rows]
  val = lambda r, k: math.nan if r.get(k) is None else r[k]  # noqa: E731
  ax = axes[0]
  for r in rows:
    ax.scatter(val(r, 'layers_mean'), val(r, 'eval_accuracy'), s=60)
    ax.annotate(r['run'], (val(r, 'layers_mean'), val(r, 'eval_accuracy')), fontsize=8,
                xytext=(4, 4), textcoords='offset points')
  ax.set_xlabel('mean layers executed (eval)')
  ax.set_ylabel('eval accuracy')
  ax.set_title('quality vs compute', fontsize=10)
  ax.grid(alpha=0.3)
  x = np.arange(len(rows))
  for ax, key, title in ((axes[1], 'eval_loss', 'eval loss'),
                         (axes[2], 'layers_mean', 'mean layers executed')):
    ax.bar(x, [val(r, key) for r in rows], color='tab:blue')
    if key == 'layers_mean':
      ax.scatter(x, [val(r, 'layers_full') for r in rows], marker='_', s=400, c='k',
                 label='full depth', zorder=3)
      ax.legend(fontsize=8)
    ax.set_xticks(x, names, rotation=20, ha='right', fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis='y')
  return _save(fig, path)


def compare_runs(workdirs: Sequence[str], out: str | None = None) -> tuple[str, list[dict]]:
  """(table text, rows) for the runs; writes the comparison PNG to `out` when given."""
  if not workdirs:
    raise ConfigError('give at least one run directory')
  rows = [run_row(w, n) for w, n in zip(workdirs, _names(workdirs))]
  if out:
    plot_compare(rows, out)
  return format_table(rows), rows
