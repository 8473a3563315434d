"""What a replay measured: latency percentiles, the SLO, quality vs full depth, plots.

`summarize` (p50 / p95 / p99 latency and time to first byte, the fraction within the budget,
throughput, time at each operating point, mean layers per byte, experts used), `agreement`
(the fraction of each request's bytes identical to full-depth greedy decoding),
`exit_latency_table` (ms per decode step by the slowest row's exit layer), `format_summary`
and the serve.png plot (load, per-request latency, the operating point over time).
"""
from __future__ import annotations

import collections
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from act_jax.serve.scheduler import Record


# ----------------------------------------------------------------------------- reports
def _pct(xs: Sequence[float], q: float) -> Optional[float]:
  return float(np.percentile(np.asarray(xs, np.float64), q)) if len(xs) else None


def agreement(served: Sequence[Record], full: Sequence[Record]) -> list[Optional[float]]:
  """Per request: the fraction of served bytes equal to full-depth greedy output at the same
  position (None for a refused request)."""
  out = []
  for s, f in zip(served, full):
    if s.error or not s.tokens:
      out.append(None)
      continue
    out.append(float(np.mean([a == b for a, b in zip(s.tokens, f.tokens)])))
  return out


def summarize(result: dict, budget_s: Optional[float], points: Sequence[Any],
              time_at: Optional[Sequence[float]] = None,
              agree: Optional[Sequence[Optional[float]]] = None,
              class_budgets: Optional[dict] = None) -> dict:
  """p50/p95/p99 latency and time to first byte, bytes/s, SLO violations, time per point,
  mean layers, per trace phase; agreement with full depth when given; per latency class
  (class_budgets: name -> p95 budget in s; a record of class '' is the first class's)."""
  recs, steps = result['records'], result['steps']
  done = [r for r in recs if r.done_s is not None]
  lat = [r.latency_s for r in done]
  ttfb = [r.first_byte_s - r.arrival_s for r in done]
  span = (max(r.done_s for r in done) - min(r.arrival_s for r in recs)) if done else 0.0
  layers = [x for r in done for x in r.layers]
  out = {'requests': len(recs), 'served': len(done),
         'refused': sum(1 for r in recs if r.error),
         'latency_ms': {f'p{q}': None if not lat else 1e3 * _pct(lat, q) for q in (50, 95, 99)},
         'ttfb_ms': {f'p{q}': None if not ttfb else 1e3 * _pct(ttfb, q) for q in (50, 95, 99)},
         'bytes_per_s': sum(len(r.tokens) for r in done) / span if span > 0 else None,
         'mean_layers': float(np.mean(layers)) if layers else None,
         'decode_steps': len(steps),
         'mean_step_ms': float(np.mean([s['step_ms'] for s in steps])) if steps else None,
         'mean_active_rows': float(np.mean([s['active'] for s in steps])) if steps else None}
  acc = [a for st in steps for a in st.get('accepted', ())]
  if acc:  # exact mode: drafts accepted per self-speculative round
    out['rounds'] = len(acc)
    out['accepted_per_round'] = float(np.mean(acc))
  if budget_s is not None:
    out['slo_p95_ms'] = 1e3 * budget_s
    out['violations'] = sum(1 for x in lat if x > budget_s)
    out['met_fraction'] = (1.0 - out['violations'] / len(lat)) if lat else None
  if time_at is not None:
    out['time_at_points_s'] = {getattr(p, 'label', str(i)) or str(i): float(t)
                               for i, (p, t) in enumerate(zip(points, time_at))}
  phases = sorted({r.phase for r in recs if r.phase})
  for ph in phases:
    sub = [r for r in done if r.phase == ph]
    sl = [r.latency_s for r in sub]
    d = {'served': len(sub), 'latency_p95_ms': None if not sl else 1e3 * _pct(sl, 95)}
    if budget_s is not None and sl:
      d['met_fraction'] = float(np.mean([x <= budget_s for x in sl]))
    out.setdefault('phases', {})[ph] = d
  if class_budgets:
    first = next(iter(class_budgets))
    for c, b in class_budgets.items():
      sub = [r for r in done if (r.cls or first) == c]
      sl = [r.latency_s for r in sub]
      tt = [r.first_byte_s - r.arrival_s for r in sub]
      ly = [x for r in sub for x in r.layers]
      out.setdefault('classes', {})[c] = {
          'served': len(sub), 'slo_p95_ms': None if b is None else 1e3 * b,
          'latency_p50_ms': None if not sl else 1e3 * _pct(sl, 50),
          'latency_p95_ms': None if not sl else 1e3 * _pct(sl, 95),
          'ttfb_p95_ms': None if not tt else 1e3 * _pct(tt, 95),
          'met_fraction': (float(np.mean([x <= b for x in sl])) if sl and b is not None
                           else None),
          'mean_layers': float(np.mean(ly)) if ly else None}
  if agree is not None:
    w = [(a, len(r.tokens), r.phase) for a, r in zip(agree, recs) if a is not None]
    mean = lambda ws: (sum(a * n for a, n, _ in ws) / sum(n for _, n, _ in ws)  # noqa: E731
                       if ws else None)
    out['agreement_with_full_depth'] = mean(w)
    for ph in phases:
      out['phases'][ph]['agreement_with_full_depth'] = mean([x for x in w if x[2] == ph])
  return out


def exit_latency_table(steps: Sequence[dict], full_layers: int) -> list[dict]:
  """ms per decode step by the exit layer of the batch's slowest row (what a step waits
  for), and ms per executed layer of that row."""
  by: dict[int, list[float]] = collections.defaultdict(list)
  for s in steps:
    by[int(round(s['max_layers']))].append(s['step_ms'])
  rows = []
  for k in sorted(by):
    ms = by[k]
    rows.append({'slowest_row_layers': k, 'steps': len(ms), 'ms_mean': float(np.mean(ms)),
                 'ms_p50': _pct(ms, 50), 'ms_per_layer': float(np.mean(ms)) / max(k, 1),
                 'layers_of_full': k / full_layers})
  return rows


def format_summary(s: dict, table: Sequence[dict]) -> str:
  f = lambda v, fmt='{:.1f}': '-' if v is None else fmt.format(v)  # noqa: E731
  lines = [f'requests {s["requests"]}, served {s["served"]}, refused {s["refused"]}; '
           f'{f(s["bytes_per_s"])} bytes/s; mean layers {f(s["mean_layers"], "{:.2f}")}; '
           f'{s["decode_steps"]} decode steps of {f(s["mean_step_ms"], "{:.2f}")} ms, '
           f'{f(s["mean_active_rows"])} rows busy on average',
           'latency ms      p50 {p50}  p95 {p95}  p99 {p99}'.format(
               **{k: f(v) for k, v in s['latency_ms'].items()}),
           'first byte ms   p50 {p50}  p95 {p95}  p99 {p99}'.format(
               **{k: f(v) for k, v in s['ttfb_ms'].items()})]
  if 'rounds' in s:
    lines.append(f'exact mode: {s["rounds"]} row rounds, {s["accepted_per_round"]:.2f} drafts '
                 f'accepted per round ({s["accepted_per_round"] + 1:.2f} bytes)')
  if 'slo_p95_ms' in s:
    lines.append(f'SLO p95 <= {s["slo_p95_ms"]:.0f} ms: {s["violations"]} violations, '
                 f'{f(s["met_fraction"], "{:.1%}")} of requests met it')
  if 'agreement_with_full_depth' in s:
    lines.append(f'bytes identical to full-depth greedy: '
                 f'{f(s["agreement_with_full_depth"], "{:.1%}")}')
  for ph, d in s.get('phases', {}).items():
    lines.append(f'  {ph:<8} served {d["served"]:4d}  p95 {f(d["latency_p95_ms"])} ms' +
                 (f'  met {f(d.get("met_fraction"), "{:.1%}")}' if 'met_fraction' in d else '') +
                 (f'  agreement {f(d.get("agreement_with_full_depth"), "{:.1%}")}'
                  if 'agreement_with_full_depth' in d else ''))
  for c, d in s.get('classes', {}).items():
    lines.append(f'  class {c or "-":<12} served {d["served"]:4d}  p50 {f(d["latency_p50_ms"])} '
                 f'p95 {f(d["latency_p95_ms"])} ms (budget {f(d["slo_p95_ms"], "{:.0f}")})  '
                 f'met {f(d["met_fraction"], "{:.1%}")}  layers {f(d["mean_layers"], "{:.2f}")}')
  if 'time_at_points_s' in s:
    lines.append('time at each point: ' + ', '.join(
        f'{k}: {v:.1f}s' for k, v in s['time_at_points_s'].items()))
  if 'drift' in s:
    lines += format_drift(s['drift'])
  lines.append('| slowest row exits at layer | steps | ms / step (mean) | ms / step (p50) | '
               'ms / layer |')
  lines.append('|---|---|---|---|---|')
  for r in table:
    lines.append(f'| {r["slowest_row_layers"]} | {r["steps"]} | {r["ms_mean"]:.2f} | '
                 f'{r["ms_p50"]:.2f} | {r["ms_per_layer"]:.3f} |')
  return '\n'.join(lines)


def format_drift(d: dict) -> list[str]:
  """The drift monitor's lines of the serving summary (monitor.Shadow.summary)."""
  f = lambda v, fmt='{:.3f}': '-' if v is None else fmt.format(v)  # noqa: E731
  w, ref, labels = d['window'], d.get('reference') or {}, d['labels']
  lines = [f'drift monitor: {d["shadowed"]} requests shadowed ({d["shadow_tokens"]} tokens, '
           f'{d["dropped"]} dropped), {d["busy_s"]:.1f}s scoring'
           + (f' ({d["busy_fraction"]:.1%} of the replay)' if 'busy_fraction' in d else '')
           + f'; {len(d["alarms"])} alarm(s); window {w["window_tokens"]} tokens, '
           f'{w["status"]}']
  for e in d['events']:
    lines.append(f'  {e["t"]:7.1f}s {e["event"]:<12} {", ".join(e["points"])}'
                 + ''.join(f'; {c or "(all)"} -> {labels[j]}' for c, (_, j) in
                           e.get('moved', {}).items()))
  if 'agreement' in w:
    ra = ref.get('agreement') or [None] * len(labels)
    lines.append('  point         certified  agreement window / held-out')
    for i, lab in enumerate(labels):
      lines.append(f'  {lab:<14}{str(w["certified"][i]):<11}{f(w["agreement"][i])} / '
                   f'{f(ra[i])}')
    lines.append(f'  first-exit confidence {f(w.get("confidence"))} / {f(ref.get("confidence"))}'
                 f'; MoE dropped {f(w.get("dropped"), "{:.2%}")} / '
                 f'{f(ref.get("dropped"), "{:.2%}")}')
  return lines


def plot(requests: Sequence[dict], steps: Sequence[dict], labels: Sequence[str],
         budget_ms: Optional[float], path: str, drift: Optional[dict] = None) -> str:
  """Load, latency and operating point over time (PNG) from requests.jsonl / steps.jsonl
  rows, so the report binary can redraw a finished replay. With the drift monitor's summary:
  a fourth panel, the window's agreement with full depth per point, and its alarms on every
  panel."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(4 if drift else 3, 1, figsize=(9, 10.5 if drift else 8), sharex=True)
  arr = [r['arrival_s'] for r in requests]
  t = [s['t'] for s in steps]
  if arr:
    end = max(max(arr), max(t, default=0.0))
    ax[0].hist(arr, bins=np.arange(0, end + 1.0, 1.0), color='tab:gray', label='arrivals / s')
  ax[0].plot(t, [s['queue'] for s in steps], color='tab:red', label='queue')
  ax[0].plot(t, [s['active'] for s in steps], color='tab:blue', label='busy slots')
  ax[0].set_ylabel('load')
  ax[0].legend(loc='upper right', fontsize=8)
  done = [r for r in requests if r.get('done_s') is not None]
  ax[1].scatter([r['arrival_s'] for r in done], [1e3 * r['latency_s'] for r in done], s=6,
                label='request latency (by arrival)')
  if budget_ms is not None:
    ax[1].axhline(budget_ms, color='tab:red', ls='--', label='p95 budget')
  ax[1].set_ylabel('ms')
  ax[1].legend(loc='upper right', fontsize=8)
  ax[2].step(t, [s['point'] for s in steps], where='post')
  ax[2].set_yticks(range(len(labels)))
  ax[2].set_yticklabels(labels, fontsize=7)
  ax[2].set_ylabel('operating point')
  ax[2].set_xlabel('time (s)')
  ax[2].invert_yaxis()
  if drift:
    tl = drift.get('timeline') or []
    for i, lab in enumerate(drift['labels'][1:], 1):
      line, = ax[3].plot([x['t'] for x in tl], [x['agreement'][i] for x in tl], label=lab)
      ref = (drift.get('reference') or {}).get('agreement')
      if ref:
        ax[3].axhline(ref[i], color=line.get_color(), ls=':', lw=0.8)
    ax[3].set_ylabel('window agreement\nwith full depth')
    ax[3].set_xlabel('time (s)  (dotted: held-out reference)')
    ax[3].legend(loc='lower left', fontsize=7, ncol=3)
    for e in drift.get('events', ()):
      for a in ax:
        a.axvline(e['t'], color='tab:red' if e['event'] == 'alarm' else 'tab:green',
                  ls='--', lw=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_dir(serve_dir: str, path: str) -> str:
  """serve.png redrawn from a serve output folder (requests.jsonl, steps.jsonl,
  summary.json)."""
  read = lambda name: [json.loads(x) for x in open(os.path.join(serve_dir, name))  # noqa: E731
                       if x.strip()]
  with open(os.path.join(serve_dir, 'summary.json')) as f:
    summary = json.load(f)
  labels = [p.get('label') or str(i) for i, p in enumerate(summary.get('points', []))]
  return plot(read('requests.jsonl'), read('steps.jsonl'), labels, summary.get('slo_p95_ms'),
              path, summary.get('drift'))


def json_default(x: Any) -> Any:
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  raise TypeError(f'not JSON serializable: {type(x)}')
