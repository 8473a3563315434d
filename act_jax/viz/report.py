"""Run report: PNG plots of what a trained adaptive-computation model does.

Each `plot_*` function takes plain arrays / dicts and writes one PNG (so tests and notebooks
can feed synthetic data); `make_report(workdir)` wires them to a training workdir:

  training_curves.png       train + eval loss, accuracy, layers executed over steps
  exit_depth_domain.png     share of held-out tokens per number of layers run, per domain
  exit_depth_difficulty.png the same per difficulty bucket (synthetic tasks only)
  token_compute.png         a held-out snippet per domain, each byte coloured by its layers
  expert_load.png           MoE: layer x expert share of routed tokens, dropped % in title
  domain_expert_usage.png   MoE: domain x expert share of top-1 choices, per MoE layer
  router_entropy.png        MoE: router entropy / max prob / drops / imbalance over training
  routing_stability.png     MoE: tokens whose top-1 expert changed between the last two
                            checkpoints, per MoE layer
  frontier.png              compute-quality frontier from workdir/calibration.json
  serve.png                 the newest `experiments.serve` replay under workdir: load,
                            latency and operating point over time

A seed sweep's directory (`experiments.sweep_seeds`, holds sweep.json) gets
  steps_vs_difficulty.png   mean steps (and accuracy) per difficulty, one line per seed,
                            the extrapolation range shaded
and each seed's own report under seed_<s>/report/.

`tokens_html` renders the same per-token compute as coloured HTML for notebooks.
"""
from __future__ import annotations

import html
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')  # headless: reports run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import jax  # noqa: E402

from act_jax import data as data_lib  # noqa: E402
from act_jax import telemetry  # noqa: E402
from act_jax.calibrate import operating_point  # noqa: E402
from act_jax.errors import ConfigError  # noqa: E402
from act_jax.model.transformer import make_model  # noqa: E402
from act_jax.run import checkpointing  # noqa: E402
from act_jax.run import directory as run_lib  # noqa: E402
from act_jax.serve import summary
from act_jax.spec import OperatingPoint, Spec  # noqa: E402
from act_jax.train import sweep  # noqa: E402

CMAP = 'YlOrRd'  # light = few layers, dark red = full depth


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
  return path


def _series(records: Sequence[Mapping[str, Any]], split: str, key: str):
  pts = [(r['step'], r[key]) for r in records if r.get('split') == split and key in r
         and r[key] is not None and math.isfinite(float(r[key]))]
  return [p[0] for p in pts], [float(p[1]) for p in pts]


# ----------------------------------------------------------------------------- plots
def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str,
                         full_layers: float | None = None) -> str:
  """Loss, accuracy and mean layers executed over steps; records as telemetry.read_metrics."""
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
  for ax, key, title in zip(axes, ('loss', 'accuracy', 'layers_mean'),
                            ('loss (nats/token)', 'accuracy', 'layers executed (mean)')):
    for split, style in (('train', '-'), ('eval', 'o-')):
      x, y = _series(records, split, key)
      if x:
        ax.plot(x, y, style, label=split, ms=4)
    if key == 'layers_mean' and full_layers:
      ax.axhline(full_layers, ls='--', c='gray', label='full depth')
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  return _save(fig, path)


def plot_exit_depth(groups: Mapping[str, Any], num_layers: int, path: str,
                    title: str = 'layers executed per token') -> str:
  """Grouped bars: share of tokens that ran 0..num_layers layers, one bar series per group.
  groups: {name: per-token layers of the VALID tokens (any shape)}."""
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * (num_layers + 1)), 3.8))
  depth = np.arange(num_layers + 1)
  width = 0.8 / max(len(groups), 1)
  for g, (name, vals) in enumerate(groups.items()):
    v = np.asarray(vals, np.float64).ravel()
    frac = telemetry.depth_histogram(v, num_layers)
    mean = float(v.mean()) if v.size else math.nan
    ax.bar(depth + (g - (len(groups) - 1) / 2) * width, frac, width,
           label=f'{name} (mean {mean:.2f}, {v.size} tok)')
  ax.set_xticks(depth)
  ax.set_xlabel(f'layers executed (of {num_layers})')
  ax.set_ylabel('share of tokens')
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis='y')
  return _save(fig, path)


def _glyph(tok: int) -> str:
  """One printable monospace character per byte token."""
  if tok == 10:
    return '¶'
  if tok == 9:
    return '→'
  if 32 <= tok < 127:
    return chr(tok)
  return {257: '«', 258: '»', 259: '|'}.get(tok, '·')  # BOS, EOS, SEP; other bytes


def _grid(ids: Sequence[int], values: Sequence[float], width: int):
  """Lay tokens out as text lines: break after a newline byte or at `width` columns."""
  rows, row = [], []
  for t, v in zip(ids, values):
    if int(t) == 256:  # PAD is not text
      continue
    row.append((_glyph(int(t)), float(v)))
    if int(t) == 10 or len(row) == width:
      rows.append(row)
      row = []
  if row:
    rows.append(row)
  return rows or [[]]


def plot_token_compute(snippets: Sequence[tuple[str, Any, Any]], num_layers: int, path: str,
                       width: int = 64) -> str:
  """Text grid per snippet (title, token ids [L], layers [L]): each byte's cell is coloured
  by the layers it executed (newline shown as ¶, non-ASCII bytes as ·)."""
  grids = [(t, _grid(np.asarray(ids).ravel(), np.asarray(lay).ravel(), width))
           for t, ids, lay in snippets]
  cols = max(1, max(len(r) for _, g in grids for r in g))  # tight: no blank columns
  heights = [len(g) + 1.2 for _, g in grids]
  fig, axes = plt.subplots(len(grids), 1, squeeze=False,
                           figsize=(0.14 * cols + 1.8, 0.26 * sum(heights) + 0.4),
                           gridspec_kw={'height_ratios': heights, 'hspace': 0.6})
  cmap = matplotlib.colormaps[CMAP]
  for ax, (title, rows) in zip(axes[:, 0], grids):
    img = np.full((len(rows), cols), np.nan)
    for r, row in enumerate(rows):
      img[r, :len(row)] = [v for _, v in row]
    im = ax.imshow(np.ma.masked_invalid(img), cmap=cmap, vmin=0, vmax=num_layers,
                   aspect='auto', interpolation='nearest')
    for r, row in enumerate(rows):
      for c, (ch, v) in enumerate(row):  # white on the dark (deep) end of the colormap
        ax.text(c, r, ch, ha='center', va='center', family='monospace', fontsize=8,
                color='white' if v > 0.65 * num_layers else 'black')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9, loc='left')
  fig.colorbar(im, ax=axes[:, 0].tolist(), label='layers executed', fraction=0.03, pad=0.01)
  return _save(fig, path)


def _heatmap(ax, mat: np.ndarray, rows: Sequence[str], cols: Sequence[str], vmax=None):
  im = ax.imshow(mat, cmap='Blues', vmin=0, vmax=vmax, aspect='auto')
  ax.set_xticks(range(len(cols)), cols, fontsize=8)
  ax.set_yticks(range(len(rows)), rows, fontsize=8)
  if mat.size <= 256:  # annotate small matrices only: large ones become unreadable
    top = vmax if vmax is not None else (np.nanmax(mat) if mat.size else 0)
    for (i, j), v in np.ndenumerate(mat):
      ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7,
              color='white' if v > 0.6 * top else 'black')
  return im


def plot_expert_load(load: Any, dropped_frac: Any, path: str) -> str:
  """Layer x expert heatmap of each MoE layer's share of routed tokens, load [layers, E]."""
  load = np.asarray(load, np.float64)
  rows = load.sum(-1, keepdims=True)
  share = np.divide(load, rows, out=np.zeros_like(load), where=rows > 0)
  n_l, n_e = share.shape
  fig, ax = plt.subplots(figsize=(max(4, 0.6 * n_e + 2), max(2.5, 0.45 * n_l + 1.5)))
  im = _heatmap(ax, share, [f'moe {i}' for i in range(n_l)], [str(e) for e in range(n_e)])
  fig.colorbar(im, ax=ax, label='share of routed tokens')
  d = np.asarray(dropped_frac, np.float64)
  ax.set_xlabel('expert')
  ax.set_title(f'expert load (uniform = {1 / max(n_e, 1):.2f}); dropped '
               f'{100 * float(np.nanmean(d)):.1f}% of assignments', fontsize=10)
  return _save(fig, path)


def plot_domain_expert_usage(usage: Any, domains: Sequence[str], path: str) -> str:
  """usage [layers, D, E] (or [D, E]) rows summing to 1: where each domain's tokens go."""
  u = np.asarray(usage, np.float64)
  u = u[None] if u.ndim == 2 else u
  n_l, n_d, n_e = u.shape
  fig, axes = plt.subplots(1, n_l, squeeze=False,
                           figsize=(max(4, (0.55 * n_e + 1) * n_l + 1.5), 0.5 * n_d + 2))
  for i, ax in enumerate(axes[0]):
    im = _heatmap(ax, u[i], list(domains), [str(e) for e in range(n_e)], vmax=1.0)
    ax.set_title(f'moe layer {i}', fontsize=9)
    ax.set_xlabel('expert')
  fig.colorbar(im, ax=axes[0].tolist(), label='share of domain tokens (top-1)')
  fig.suptitle('domain x expert usage', fontsize=10, y=1.02)
  return _save(fig, path)


def plot_router_entropy(records: Sequence[Mapping[str, Any]], path: str,
                        num_experts: int | None = None) -> str:
  """Router entropy, max prob, dropped fraction and load imbalance over training steps."""
  panels = (('moe/router_entropy', 'router entropy (nats)'), ('moe/max_prob', 'max router prob'),
            ('moe/dropped_frac', 'dropped fraction'), ('moe/load_imbalance', 'load max/mean'))
  fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
  for ax, (key, title) in zip(axes, panels):
    for split, style in (('train', '-'), ('eval', 'o-')):
      x, y = _series(records, split, key)
      if x:
        ax.plot(x, y, style, ms=4, label=split)
    if key == 'moe/router_entropy' and num_experts:
      ax.axhline(math.log(num_experts), ls='--', c='gray', label='uniform (log E)')
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  return _save(fig, path)


def plot_routing_stability(changed: Any, step_a: int, step_b: int, path: str) -> str:
  """Bars: per MoE layer, fraction of tokens whose top-1 expert changed from step_a to b."""
  c = np.asarray(changed, np.float64)
  fig, ax = plt.subplots(figsize=(max(4, 0.8 * c.size + 2), 3.2))
  ax.bar(np.arange(c.size), c, color='tab:purple')
  ax.set_xticks(np.arange(c.size), [f'moe {i}' for i in range(c.size)])
  ax.set_ylim(0, max(1e-3, float(np.nanmax(c)) * 1.2) if c.size else 1)
  ax.set_ylabel('tokens that changed expert')
  ax.set_title(f'routing stability: checkpoint {step_a} -> {step_b} '
               f'(mean {float(np.nanmean(c)) if c.size else math.nan:.1%} changed)', fontsize=10)
  ax.grid(alpha=0.3, axis='y')
  return _save(fig, path)


def _floats(xs: Any) -> np.ndarray:
  return np.array([math.nan if x is None else float(x) for x in xs], np.float64)


def plot_frontier(cal: Mapping[str, Any], path: str) -> str:
  """Accuracy / consistency vs mean layers over thresholds (calibration.json format)."""
  fr = cal['frontier']
  x, thr = _floats(fr['mean_layers']), _floats(fr['thresholds'])
  ms = _floats(fr['ms_per_token']) if fr.get('ms_per_token') else None
  fig, axes = plt.subplots(1, 2 if ms is not None else 1, squeeze=False,
                           figsize=(11 if ms is not None else 6, 4))
  ax = axes[0, 0]
  for key, style in (('accuracy', 'o-'), ('consistency', 's--')):
    if fr.get(key):
      ax.plot(x, _floats(fr[key]), style, ms=4, label=key)
  for xi, yi, t in zip(x, _floats(fr.get('consistency') or fr.get('accuracy') or x), thr):
    ax.annotate(f'{t:.2g}', (xi, yi), fontsize=7, xytext=(3, 3), textcoords='offset points')
  if cal.get('static'):
    ax.plot(_floats(cal['static']['layers']), _floats(cal['static']['accuracy']), 'x:', ms=4,
            c='tab:orange', label='static truncation (accuracy)')
  full = cal.get('full_layers')
  if full:
    ax.axvline(float(full), ls=':', c='gray', label='full depth')
  chosen = cal.get('chosen_threshold')
  if chosen is not None and thr.size:
    i = int(np.argmin(np.abs(thr - float(chosen))))
    ax.axvline(x[i], c='tab:red', alpha=0.6, label=f'chosen λ={float(chosen):.3g}')
  ax.set_xlabel('mean layers executed')
  ax.set_ylabel('held-out score')
  ax.set_title(f'{cal.get("policy", "?")}: tolerance {cal.get("tolerance", "?")}, '
               f'risk {cal.get("risk", "?")}', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if ms is not None:
    axes[0, 1].plot(x, ms, 'o-', c='tab:green')
    axes[0, 1].set_xlabel('mean layers executed')
    axes[0, 1].set_ylabel('ms / token')
    axes[0, 1].set_title('measured latency', fontsize=10)
    axes[0, 1].grid(alpha=0.3)
  return _save(fig, path)


def tokens_html(ids: Sequence[int], layers: Sequence[float], num_layers: int) -> str:
  """HTML spans, one per byte, background coloured by layers executed (notebooks)."""
  cmap = matplotlib.colormaps[CMAP]
  spans = []
  for t, v in zip(np.asarray(ids).ravel(), np.asarray(layers, np.float64).ravel()):
    t = int(t)
    if t == 256:
      continue
    rgb = matplotlib.colors.to_hex(cmap(float(v) / max(num_layers, 1)))
    ch = '↵' if t == 10 else _glyph(t)
    spans.append(f'<span title="{v:g} layers" style="background:{rgb};font-family:monospace;'
                 f'white-space:pre">{html.escape(ch)}</span>' + ('<br>' if t == 10 else ''))
  legend = ' '.join(f'<span style="background:{matplotlib.colors.to_hex(cmap(k / max(num_layers, 1)))};'
                    f'font-family:monospace">&nbsp;{k}&nbsp;</span>' for k in range(num_layers + 1))
  return f'<div style="line-height:1.5">{"".join(spans)}</div><div>layers: {legend}</div>'




# ----------------------------------------------------------------------------- wiring
def _make_forward(spec: Spec, op: OperatingPoint) -> Callable:
  """Jitted eval-model forward (train=False) returning only what the plots need."""
  model = make_model(spec, train=False)
  threshold_N = op.vector(spec)

  @jax.jit
  def fwd(variables, tokens):
    _, aux = model.apply(variables, tokens, threshold=threshold_N)
    out = {'layers': aux['layers'], 'valid': aux['valid']}
    if 'moe' in aux:
      m = aux['moe']
      out.update(top1=m['top1_expert'], load=m['load'], dropped=m['dropped_frac'])
    return out

  return fwd


def _eval_pass(fwd: Callable, state: Mapping[str, Any], batches: Sequence[Mapping],
               log: Callable[[str], None], label: str) -> dict[str, np.ndarray]:
  """Forward over held-out batches with progress/ETA lines; concatenates along the batch."""
  variables = {'params': state['params'], 'moe_state': state['moe_state']}
  prog = telemetry.Progress(len(batches))
  outs = []
  for i, b in enumerate(batches):
    outs.append(jax.device_get(fwd(variables, b['inputs'])))
    log(f'[report] {label}: {prog.update(i + 1).replace("step ", "batch ", 1)}')
  ev = {k: np.concatenate([o[k] for o in outs], 0) for k in ('layers', 'valid')}
  for k in ('inputs', 'domain', 'difficulty'):
    ev[k] = np.concatenate([np.asarray(b[k]) for b in batches], 0)
  if 'top1' in outs[0]:
    ev['top1'] = np.concatenate([o['top1'] for o in outs], 1)      # [layers, B, L]
    ev['load'] = np.sum([o['load'] for o in outs], 0)               # [layers, E]
    ev['dropped'] = np.mean([o['dropped'] for o in outs], 0)        # [layers]
  return ev


def _calibration(workdir: str) -> dict:
  return run_lib.read_calibration(workdir) or {}


def _model_plots(workdir: str, records: list[dict], out: Callable[[str], str],
                 log: Callable[[str], None], num_batches: int | None) -> list[str]:
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps: list[int] = []
  if os.path.isdir(ckpt_dir):
    ck = checkpointing.Checkpointer(ckpt_dir, read_only=True)
    steps = sorted(ck.all_steps())
    ck.close()
  if not steps:
    log(f'[report] no checkpoint in {ckpt_dir}: skipping exit-depth, token and MoE plots')
    return []
  log(f'[report] loading checkpoint {steps[-1]} of {workdir}')
  spec, state = run_lib.load(workdir, steps[-1])[:2]
  dataset = data_lib.make_dataset(spec.data, spec.seed)
  batches = dataset.eval_batches(num_batches or spec.train.eval_batches)
  # The run's operating point: the calibrated one when there is one, else the policy default.
  op, _ = operating_point.run_operating_point(workdir, spec)
  at = f'threshold {op.threshold:g}' + ('' if op.max_layers is None else
                                        f', max_layers {op.max_layers}')
  fwd = _make_forward(spec, op)
  ev = _eval_pass(fwd, state, batches, log, f'held-out forward (step {steps[-1]})')
  n_layers, valid, written = spec.model.num_layers, ev['valid'], []
  groups = {name: ev['layers'][valid & (ev['domain'] == i)[:, None]]
            for i, name in enumerate(dataset.domains) if np.any(ev['domain'] == i)}
  written.append(plot_exit_depth(groups, n_layers, out('exit_depth_domain.png'),
                                 f'layers executed per held-out token, by domain '
                                 f'(step {steps[-1]}, {at})'))
  if np.any(ev['difficulty'] > 0):
    diff = {f'difficulty {d}': ev['layers'][valid & (ev['difficulty'] == d)[:, None]]
            for d in np.unique(ev['difficulty'])}
    written.append(plot_exit_depth(diff, n_layers, out('exit_depth_difficulty.png'),
                                   f'layers executed per held-out token, by difficulty ({at})'))
  snippets = []
  for i, name in enumerate(dataset.domains):
    rows = np.flatnonzero(ev['domain'] == i)
    if rows.size:
      r = rows[0]
      mean = float(ev['layers'][r][valid[r]].mean())
      snippets.append((f'{name}: held-out snippet (mean {mean:.2f} of {n_layers} layers, {at})',
                       ev['inputs'][r], ev['layers'][r]))
  written.append(plot_token_compute(snippets, n_layers, out('token_compute.png')))
  if 'top1' not in ev:
    log('[report] dense model (moe.router=none): no MoE plots')
    return written
  n_exp = ev['load'].shape[-1]
  written.append(plot_expert_load(ev['load'], ev['dropped'], out('expert_load.png')))
  usage = np.stack([telemetry.domain_expert_usage(t, ev['domain'], len(dataset.domains), n_exp,
                                                  mask=valid) for t in ev['top1']])
  written.append(plot_domain_expert_usage(usage, dataset.domains, out('domain_expert_usage.png')))
  if any('moe/router_entropy' in r for r in records):
    written.append(plot_router_entropy(records, out('router_entropy.png'), n_exp))
  else:
    log('[report] no moe/router_entropy in metrics.jsonl: skipping router_entropy.png')
  if len(steps) < 2:
    log(f'[report] routing stability skipped: only one checkpoint (step {steps[-1]}); keep '
        f'train.keep_checkpoints >= 2 to compare two')
  else:
    _, prev = run_lib.load(workdir, steps[-2])[:2]
    ev_prev = _eval_pass(fwd, prev, batches, log, f'held-out forward (step {steps[-2]})')
    changed = telemetry.routing_stability_per_layer(ev_prev['top1'], ev['top1'], valid)
    written.append(plot_routing_stability(changed, steps[-2], steps[-1],
                                          out('routing_stability.png')))
  return written


def plot_steps_vs_difficulty(sweep_res: Mapping[str, Any], path: str) -> str:
  """Mean steps (left) and accuracy (right) per difficulty, one line per seed of a sweep
  (sweep.json's rows); collapsed seeds dashed; the extrapolation range shaded."""
  fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
  rows = sweep_res['seeds']
  for r in rows:
    d = np.array([int(k) for k in r['steps_by_difficulty']])
    order = np.argsort(d)
    steps = np.array(list(r['steps_by_difficulty'].values()), np.float64)[order]
    acc = np.array(list(r['accuracy_by_difficulty'].values()), np.float64)[order]
    style = '--' if r['collapse'] else '-'
    label = f'seed {r["seed"]} (rho {r["spearman"]:.2f}{", collapsed" if r["collapse"] else ""})'
    ax.plot(d[order], steps, style, marker='.', label=label)
    ax_acc.plot(d[order], acc, style, marker='.', label=f'seed {r["seed"]}')
  extra = (sweep_res.get('ranges') or {}).get('extrapolation')
  for a in (ax, ax_acc):
    if extra:
      a.axvspan(extra[0] - 0.5, extra[1] + 0.5, color='0.85', zorder=0, label='extrapolation')
    a.set_xlabel('difficulty')
    a.grid(alpha=0.3)
  full = rows[0]['full'] if rows else 1
  ax.set_ylim(0, full + 0.5)
  ax.set_ylabel(f'mean steps (of {full})')
  ax.set_title(f'{sweep_res["task"]} / {sweep_res["halting"]}: steps vs difficulty '
               f'(collapse rate {sweep_res["collapse_rate"]:.0%})')
  ax.legend(fontsize=7)
  ax_acc.set_ylim(0, 1.05)
  ax_acc.set_ylabel('held-out accuracy')
  ax_acc.set_title('accuracy vs difficulty')
  return _save(fig, path)


def make_report(workdir: str, out_dir: str | None = None, log: Callable[[str], None] = print,
                num_batches: int | None = None) -> list[str]:
  """Writes the report PNGs of a training workdir into out_dir (default workdir/report).
  A sweep directory (sweep.json) gets steps_vs_difficulty.png and each seed its own report.

  Raises ConfigError naming the path when workdir has no (or an empty) metrics.jsonl. Plots
  that need a checkpoint, MoE or calibration.json are skipped with a logged note.
  """
  if out_dir:
    run_lib.check_output_dir(out_dir, '--out', ('*.png',), 'a report (PNGs)')
  sweep_res = sweep.read_sweep(workdir)
  if sweep_res is not None:
    out_dir = out_dir or os.path.join(workdir, 'report')
    written = [plot_steps_vs_difficulty(sweep_res, os.path.join(out_dir,
                                                                'steps_vs_difficulty.png'))]
    log(f'[report] wrote {written[0]}')
    for r in sweep_res['seeds']:
      written += make_report(os.path.join(workdir, f'seed_{r["seed"]}'), log=log,
                             num_batches=num_batches)
    return written
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(metrics_path):
    raise ConfigError(f'no metrics file at {metrics_path}: {workdir!r} is not a training '
                     f'workdir (run python -m experiments.train --workdir=... first)')
  records = telemetry.read_metrics(workdir)
  if not records:
    raise ConfigError(f'{metrics_path} holds no metric records yet')
  # every file the plots read is checked before the first PNG is written
  if os.path.isdir(run_lib.path(workdir, run_lib.CHECKPOINTS)):
    run_lib.read_config(workdir)
  else:
    run_lib.read_json(run_lib.path(workdir, run_lib.CONFIG))
  _calibration(workdir)
  out_dir = out_dir or os.path.join(workdir, 'report')
  os.makedirs(out_dir, exist_ok=True)
  out = lambda name: os.path.join(out_dir, name)  # noqa: E731
  full = next((r['layers_full'] for r in reversed(records) if 'layers_full' in r), None)
  written = [plot_training_curves(records, out('training_curves.png'), full)]
  written += _model_plots(workdir, records, out, log, num_batches)
  cal = _calibration(workdir)
  if cal:
    written.append(plot_frontier(cal, out('frontier.png')))
  else:
    log(f'[report] no {workdir}/calibration.json: skipping frontier.png (run '
        f'python -m experiments.calibrate --workdir=... first)')
  serve_dir = latest_serve_dir(workdir)
  if serve_dir:
    written.append(summary.plot_dir(serve_dir, out('serve.png')))
    log(f'[report] serve: {serve_dir} ({_serve_line(serve_dir)})')
  for p in written:
    log(f'[report] wrote {p}')
  return written


def latest_serve_dir(workdir: str) -> str | None:
  """The newest folder under workdir written by experiments.serve (summary.json +
  steps.jsonl + requests.jsonl), or None."""
  found = []
  for name in os.listdir(workdir):
    d = os.path.join(workdir, name)
    if all(os.path.isfile(os.path.join(d, f))
           for f in ('summary.json', 'steps.jsonl', 'requests.jsonl')):
      found.append((os.path.getmtime(os.path.join(d, 'summary.json')), d))
  return max(found)[1] if found else None


def _serve_line(serve_dir: str) -> str:
  with open(os.path.join(serve_dir, 'summary.json')) as f:
    s = json.load(f)
  lat = s.get('latency_ms', {})
  parts = [f"{s.get('served')} served", f"p95 {lat.get('p95') or 0:.0f} ms"]
  if s.get('met_fraction') is not None:
    parts.append(f"{s['met_fraction']:.1%} within {s['slo_p95_ms']:.0f} ms")
  if s.get('agreement_with_full_depth') is not None:
    parts.append(f"{s['agreement_with_full_depth']:.1%} bytes = full depth")
  return ', '.join(parts)
