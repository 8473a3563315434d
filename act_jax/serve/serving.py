"""Serving a trained run: one call that replays a trace under a controller and reports it.

`serve_run` (the `serve` binary): load the run and the trace, pick the operating points
(`load_points`: full depth plus the certified points of RUN/calibration.json, for the SLO
controller of act_jax/serve/slo.py; or one fixed point; or exact mode), build the engine
(engine.py), replay the trace through the scheduler (scheduler.py), decode every request
again at full depth for the agreement, and write what summary.py computes into a directory:
requests.jsonl, steps.jsonl, summary.json, serve.png. `ServeOptions` holds its flags. With
--shadow_fraction the drift monitor (monitor.py: `make_shadow`, `warm_shadow`) re-tests the
certificate on live traffic and the directory also gets shadow.jsonl.

Prompts come from the trace, or (`heldout_prompts`) from the held-out split of the run's own
data, so a served prompt was never trained on.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from act_jax import data as data_lib
from act_jax.calibrate import operating_point
from act_jax.calibrate.counts import SHADOW_LOG
from act_jax.data import PAD as PAD_ID
from act_jax.errors import ConfigError
from act_jax.infer import draft as draft_lib
from act_jax.infer import inference, speculative
from act_jax.run import directory as run_lib
from act_jax.serve import monitor as monitor_lib
from act_jax.serve import server, slo
from act_jax.serve import trace as trace_lib
from act_jax.serve.engine import Engine, MODES
from act_jax.serve.scheduler import Request, check_request, replay
from act_jax.serve.summary import (agreement, exit_latency_table, format_summary, json_default,
                                   plot, summarize)
from act_jax.spec import NEVER_EXIT, OperatingPoint, Spec


# ----------------------------------------------------------------------------- points, prompts
def load_points(workdir: str, spec: Spec, min_gap: float = 0.1) -> list:
  """The run's operating points for a controller, most accurate first: full depth, then the
  (threshold, cap) points of RUN/calibration.json by calibration mean layers, descending.

  A point is kept only if it runs at least min_gap * depth fewer layers than the last kept
  one of the same certification (near-duplicates would make every controller move tiny),
  and the cheapest one always is. Uncertified points are listed (certified=False) for
  --allow_uncertified."""
  path = run_lib.path(workdir, run_lib.CALIBRATION)
  saved = run_lib.read_calibration(workdir)
  if saved is None:
    raise ConfigError(f'{path} is missing: run `python -m experiments.calibrate '
                      f'--workdir={workdir} --caps=0,...` first (the SLO controller moves '
                      f'along its certified points), or serve with --controller=fixed')
  raw = saved.get('points')
  if raw is None:  # written before calibrate listed its points: the chosen one only
    raw = []
    if saved.get('chosen_threshold') is not None:
      raw = [{'threshold': saved['chosen_threshold'], 'max_layers': saved.get('max_layers'),
              'certified': saved.get('mode') == 'ltt',
              'calib_mean_layers': saved['calib']['mean_layers'],
              'mean_layers': saved['test']['mean_layers'],
              'consistency': saved['test'].get('consistency')}]
  full = float(spec.model.num_layers)
  points = [slo.Point(NEVER_EXIT, None, True, full, 1.0, 'full depth')]
  for cert in (True, False):
    kept, last = [], full
    group = sorted((p for p in raw if bool(p['certified']) == cert),
                   key=lambda p: -p['calib_mean_layers'])
    for p in group:
      if p['calib_mean_layers'] <= last - min_gap * full:
        kept.append(p)
        last = p['calib_mean_layers']
    if group and (not kept or kept[-1] is not group[-1]):  # always offer the cheapest
      if kept and kept[-1]['calib_mean_layers'] - group[-1]['calib_mean_layers'] < \
          min_gap * full:
        kept.pop()
      kept.append(group[-1])
    for p in kept:
      cap = p.get('max_layers')
      # cost proxy: the calibration half's mean layers (the order they were picked by)
      points.append(slo.Point(float(p['threshold']), cap, cert, float(p['calib_mean_layers']),
                              p.get('consistency'),
                              OperatingPoint(float(p['threshold']), cap).label))
  points[1:] = sorted(points[1:], key=lambda p: -p.mean_layers)
  for p in points[1:]:  # a cap that is not an exit layer of this model: the file is wrong
    OperatingPoint(p.threshold, p.max_layers).validate(spec, f'{path}: threshold',
                                                       f'{path}: max_layers')
  return points


def heldout_prompts(spec: Spec, trace: Sequence[Any]) -> list[Request]:
  """Requests of a trace with prompts as token ids: a trace line's own prompt, else the
  next held-out window of its domain, cut to its prompt length (the embedded corpus)."""
  ds = data_lib.make_dataset(spec.data, spec.seed)
  need = [t for t in trace if t.prompt is None]
  rows: dict[str, list[np.ndarray]] = {}
  if need:
    if not set(getattr(ds, 'domains', ())) >= {'code', 'prose'}:
      raise ConfigError(f'data.name={spec.data.name!r} has no code/prose held-out text to '
                        f'draw prompts from; give the prompts in a JSONL trace')
    per_batch = max(1, spec.data.batch_size)
    batches = ds.eval_batches(max(1, -(-2 * len(need) // per_batch)))
    for b in batches:
      for x, d in zip(b['inputs'], b['domain']):
        rows.setdefault(ds.domains[int(d)], []).append(x[x != PAD_ID])
  used = collections.Counter()
  out = []
  for t in trace:
    if t.prompt is not None:
      prompt = list(t.prompt)  # bytes are token ids 0..255
    else:
      pool = rows[t.domain]
      for _ in range(len(pool)):  # the next window long enough for this prompt, if any
        row = pool[used[t.domain] % len(pool)]
        used[t.domain] += 1
        if len(row) >= t.prompt_len:
          break
      prompt = [int(x) for x in row[:t.prompt_len]]
    out.append(Request(t.id, t.arrival_s, prompt, t.max_new, t.domain, t.phase, t.cls))
  return out


def check_generated_trace(trace: str, max_len: int) -> None:
  """A generated trace whose prompt= and new= ranges can exceed the model's context would
  see its requests refused one by one: refuse it up front, in one line. (A JSONL trace's
  requests are refused alone; one with no servable request is an error in serve_run.)"""
  kind, o = trace_lib.options(trace)
  if kind == 'jsonl':
    return
  (p_lo, p_hi), (n_lo, n_hi) = o['prompt'], o['new']
  if p_hi + n_hi > max_len:
    half = max(1, max_len // 2)
    raise ConfigError(f'--trace={trace}: prompt={p_lo}-{p_hi} + new={n_lo}-{n_hi} bytes reach '
                      f'{p_hi + n_hi}, past the model context {max_len} (model.max_len); give '
                      f'ranges that fit, e.g. prompt={min(p_lo, half)}-{half},new=1-'
                      f'{max_len - half}')


# ----------------------------------------------------------------------------- one call
CONTROLLERS = ('slo', 'fixed')


@dataclasses.dataclass(frozen=True)
class ServeOptions:
  """How a trace is served: the `serve` binary's flags (docs/binaries.md), checked together."""
  controller: str = 'slo'              # slo: move along certified points; fixed: one point
  slo_p95_ms: Optional[float] = None   # the p95 latency budget (ms); needed by 'slo'
  threshold: Optional[float] = None    # 'fixed': the point (default: the run's operating point)
  max_layers: Optional[int] = None     # 'fixed': its depth cap
  allow_uncertified: bool = False      # 'slo' may use points that failed certification
  slots: int = 8                       # rows of the running batch
  kv_fill: str = 'project'             # K/V of skipped layers (inference.KV_FILL)
  compact: bool = False                # exited rows stop costing compute
  steps_per_call: int = 4              # decode steps (exact mode: rounds) per device call
  static_batches: bool = False         # the baseline without continuous batching
  quality: bool = True                 # afterwards, agreement with full-depth decoding
  mode: str = 'threshold'              # engine.MODES
  draft_layer: Optional[int] = None    # exact mode (default: the fastest measured)
  draft_len: Optional[int] = None
  classes: tuple = ()                  # latency classes 'name=p95_ms', tightest first
  prefill_chunk: int = 64              # prompt tokens per prefill call (0: whole prompts)
  shadow_fraction: float = 0.0         # of finished requests scored at every point (drift)
  monitor_window: int = 4096           # the drift monitor's window, in shadow tokens

  def class_budgets(self) -> list[tuple[str, Optional[float]]]:
    """[(class name, p95 budget in s)]: the --classes, else one class '' at --slo_p95_ms.
    ConfigError for an entry that is not NAME=P95_MS."""
    if not self.classes:
      return [('', None if self.slo_p95_ms is None else self.slo_p95_ms / 1e3)]
    out = []
    for c in self.classes:
      name, sep, ms = c.partition('=') if isinstance(c, str) else (c[0], '=', str(c[1]))
      try:
        budget = float(ms) if sep and name.isidentifier() else -1.0
      except ValueError:
        budget = -1.0
      if not budget > 0:
        raise ConfigError(f'--classes={c}: must be NAME=P95_MS, NAME an identifier, P95_MS '
                          f'> 0')
      out.append((name, budget / 1e3))
    return out

  def validate(self) -> None:
    """ConfigError naming the first flag that is out of range or does not apply."""
    if self.mode not in MODES:
      raise ConfigError(f'--mode={self.mode!r}: allowed: {", ".join(MODES)}')
    if self.mode == 'exact':
      if self.controller != 'fixed':
        raise ConfigError('--mode=exact serves full depth by construction: use '
                          '--controller=fixed (there is no operating point to move)')
      if self.threshold is not None or self.max_layers is not None:
        raise ConfigError('--threshold/--max_layers apply to --mode=threshold (exact mode '
                          'serves full-depth output)')
      if self.compact or self.kv_fill != 'project':
        raise ConfigError('--compact/--kv_fill apply to --mode=threshold (exact mode skips no '
                          'layer of a verified byte)')
    elif self.draft_layer is not None or self.draft_len is not None:
      raise ConfigError('--draft_layer/--draft_len apply to --mode=exact')
    if self.controller not in CONTROLLERS:
      raise ConfigError(f'--controller={self.controller!r}: allowed: {", ".join(CONTROLLERS)}')
    if self.slo_p95_ms is not None and not self.slo_p95_ms > 0:
      raise ConfigError(f'--slo_p95_ms={self.slo_p95_ms}: must be > 0')
    for name, v in (('--slots', self.slots), ('--steps_per_call', self.steps_per_call)):
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f'{name}={v!r}: must be an integer >= 1')
    if self.kv_fill not in inference.KV_FILL:
      raise ConfigError(f'--kv_fill={self.kv_fill!r}: allowed: {", ".join(inference.KV_FILL)}')
    if self.controller == 'slo' and self.slo_p95_ms is None and not self.classes:
      raise ConfigError('--controller=slo needs --slo_p95_ms (the p95 latency budget) or '
                        '--classes (a budget per latency class)')
    if self.classes:
      names = [name for name, _ in self.class_budgets()]
      if len(set(names)) != len(names):
        raise ConfigError(f'--classes: {", ".join(names)}: each class once')
      if self.slo_p95_ms is not None:
        raise ConfigError('--slo_p95_ms is one budget for every request; with --classes each '
                          'class has its own (NAME=P95_MS): give one or the other')
      if self.compact:
        raise ConfigError('--classes run rows at different points in one batch; --compact '
                          'runs one point per call: drop one of them')
      if self.mode == 'exact':
        raise ConfigError('--classes: exact mode serves full depth to everyone')
    if not isinstance(self.prefill_chunk, int) or isinstance(self.prefill_chunk, bool) or \
        self.prefill_chunk < 0:
      raise ConfigError(f'--prefill_chunk={self.prefill_chunk!r}: an integer >= 0')
    if self.controller == 'slo' and (self.threshold is not None or self.max_layers is not None):
      raise ConfigError('--threshold/--max_layers fix the point: use them with '
                        '--controller=fixed (slo picks from calibration.json)')
    self.shadow_options().validate()
    if self.shadow_fraction > 0 and self.mode == 'exact':
      raise ConfigError('--shadow_fraction: exact mode serves full-depth output; there is no '
                        'operating point to monitor')

  def shadow_options(self) -> monitor_lib.ShadowOptions:
    return monitor_lib.ShadowOptions(self.shadow_fraction, self.monitor_window)


@dataclasses.dataclass
class Setup:
  """What serving a run needs, built once (`prepare`): the spec and weights, the points
  (slo.Point, most accurate first) and their OperatingPoints, one controller per latency
  class, and the engine (not warmed up)."""
  spec: Spec
  variables: Any
  points: list
  ops: list
  classes: dict                 # class name -> controller (one '' class without --classes)
  budgets: dict                 # class name -> p95 budget (s) or None
  engine: Engine
  draft_layer: Optional[int]
  draft_len: Optional[int]
  shadow: Optional[monitor_lib.Shadow] = None   # the drift monitor (--shadow_fraction > 0)


def prepare(workdir: str, o: ServeOptions, log: Callable[[str], None] = print,
            controller_kwargs: Optional[dict] = None) -> Setup:
  """Loads the run and builds the points, the controllers and the engine for options o."""
  o.validate()
  spec, variables, step = run_lib.load(workdir)
  draft_layer, draft_len = o.draft_layer, o.draft_len
  budgets = dict(o.class_budgets())
  if o.controller == 'slo':
    points = load_points(workdir, spec)
    classes = {name: slo.SLOController(points, budget, allow_uncertified=o.allow_uncertified,
                                       **(controller_kwargs or {}))
               for name, budget in budgets.items()}
  elif o.mode == 'exact':
    speculative.check_exact(spec, draft_layer, draft_len)
    draft_layer, draft_len, how = draft_lib.resolve_draft(
        spec, variables, draft_layer, draft_len, o.slots, workdir, step, log)
    points = [slo.Point(NEVER_EXIT, None, True, float(spec.model.num_layers), None,
                        f'exact k={draft_layer} d={draft_len}')]
    classes = {name: slo.FixedController(points) for name in budgets}
    log(f'exact mode: draft_layer={draft_layer} draft_len={draft_len} ({how})')
  else:
    op, source = operating_point.run_operating_point(workdir, spec, o.threshold, o.max_layers)
    points = [slo.Point(op.threshold, op.max_layers, True, float(spec.model.num_layers), None,
                        op.label)]
    home = 0
    if o.shadow_fraction > 0:  # the monitor needs the chain to fall back along
      points, home = chain_with(load_points(workdir, spec), op, workdir)
    classes = {name: slo.FixedController(points, home) for name in budgets}
    log(f'fixed operating point {points[home].label} ({source})')
  ops = [OperatingPoint(p.threshold, p.max_layers) for p in points]
  engine = Engine(spec, variables, o.slots, o.kv_fill, o.compact, o.steps_per_call, o.mode,
                  draft_layer, draft_len, prefill_chunk=o.prefill_chunk)
  shadow = None
  if o.shadow_fraction > 0:
    shadow = make_shadow(workdir, spec, variables, points, o.shadow_options(), log)
  return Setup(spec, variables, points, ops, classes, budgets, engine, draft_layer, draft_len,
               shadow)


def chain_with(points: list, op: OperatingPoint, workdir: str) -> tuple[list, int]:
  """The chain of points with the fixed point `op` in it (inserted by its calibrated cost
  if pruned away): (points, its index). ConfigError when calibration.json never tried it."""
  for i, p in enumerate(points):
    if OperatingPoint(p.threshold, p.max_layers) == op:
      return points, i
  saved = run_lib.read_calibration(workdir) or {}
  for p in saved.get('points') or ():
    if float(p['threshold']) == op.threshold and p.get('max_layers') == op.max_layers:
      new = slo.Point(op.threshold, op.max_layers, bool(p['certified']),
                      float(p['calib_mean_layers']), p.get('consistency'), op.label)
      out = sorted(points[1:] + [new], key=lambda q: -q.mean_layers)
      return [points[0]] + out, 1 + out.index(new)
  raise ConfigError(f'--shadow_fraction with --controller=fixed monitors the fixed point '
                    f'against calibration.json\'s points; threshold={op.threshold:g}, '
                    f'max_layers={op.max_layers} is not one of them (calibrate with it, or '
                    f'serve the certified point)')


def make_shadow(workdir: str, spec: Spec, variables: Any, points: Sequence[slo.Point],
                options: monitor_lib.ShadowOptions,
                log: Callable[[str], None] = print) -> monitor_lib.Shadow:
  """The drift monitor over the chain `points`, testing calibration.json's measure,
  tolerance and risk on live shadow tokens (act_jax/serve/monitor.py)."""
  saved = run_lib.read_calibration(workdir)
  if saved is None:
    raise ConfigError(f'--shadow_fraction: {run_lib.path(workdir, run_lib.CALIBRATION)} is '
                      f'missing; the monitor re-tests its certificate on live traffic '
                      f'(run experiments.calibrate first)')
  measure = saved.get('measure') or 'consistency'
  mon = monitor_lib.Monitor([p.certified for p in points], measure,
                            float(saved['tolerance']), float(saved['risk']),
                            options.window_tokens)
  scorer = monitor_lib.ShadowScorer(spec, variables,
                                    [OperatingPoint(p.threshold, p.max_layers) for p in points])
  labels = [p.label or f'{p.threshold:g}' for p in points]
  log(f'drift monitor: {options.fraction:.0%} of requests shadowed at {len(points)} points, '
      f'{measure} tolerance {mon.tolerance:g} risk {mon.risk:g} on a window of '
      f'{options.window_tokens} tokens')
  return monitor_lib.Shadow(scorer, mon, options, labels, log)


def warm_shadow(shadow: monitor_lib.Shadow, spec: Spec, log: Callable[[str], None] = print
                ) -> dict:
  """Compiles the shadow scorer and measures the drift statistics on held-out windows of
  the run's own data (the reference the live window is compared with; {} without text)."""
  secs = shadow.scorer.warmup()
  ref = {}
  ds = data_lib.make_dataset(spec.data, spec.seed)
  if set(getattr(ds, 'domains', ())) >= {'code', 'prose'}:
    rows = [x[x != PAD_ID] for x in ds.eval_batches(1)[0]['inputs']][:16]
    ref = monitor_lib.reference(shadow.scorer, rows)
  shadow.reference = ref
  log(f'drift monitor: scorer compiled in {secs:.1f}s; reference agreement on held-out '
      f'data: ' + ', '.join(f'{lab} {a:.3f}' for lab, a in
                            zip(shadow.labels, ref.get('agreement', ()))))
  return ref


def serve_http(workdir: str, listen: str, options: ServeOptions = ServeOptions(),
               log: Callable[[str], None] = print, out: Optional[str] = None) -> None:
  """Serves the run over HTTP on listen='host:port' until SIGTERM (act_jax/serve/server.py):
  the same engine, scheduler and controllers as serve_run, requests from clients. With the
  drift monitor on, `out` receives shadow.jsonl when the server exits."""
  host, _, port = listen.rpartition(':')
  if out is not None:
    run_lib.check_output_dir(out, '--out', (SHADOW_LOG,), 'a drift monitor log')
  st = prepare(workdir, options, log)
  if st.shadow is not None:  # compiled before the server listens: nothing compiles after
    warm_shadow(st.shadow, st.spec, log)
  classes = [server.LatencyClass(name, ctl, st.budgets[name])
             for name, ctl in st.classes.items()]
  app = server.build(st.engine, st.spec, st.points, st.ops, classes,
                     os.path.basename(os.path.abspath(workdir)), log, st.shadow)
  server.serve(app, host, int(port), log)
  if st.shadow is not None and out is not None:
    os.makedirs(out, exist_ok=True)
    monitor_lib.write_jsonl(st.shadow, os.path.join(out, SHADOW_LOG))
    log(f'wrote {os.path.join(out, SHADOW_LOG)} ({len(st.shadow.rows)} shadowed requests)')


def serve_run(workdir: str, trace: str, options: ServeOptions = ServeOptions(),
              out: Optional[str] = None, log: Callable[[str], None] = print,
              controller_kwargs: Optional[dict] = None) -> dict:
  """Replays a trace through a continuous-batching server on a trained run (what
  `experiments.serve` and the notebook call). Writes into `out` (default: a fresh
  RUN/serve-<time>/): requests.jsonl, steps.jsonl, summary.json and serve.png.

  options.controller='slo' moves along the certified points of RUN/calibration.json to keep
  p95 latency under slo_p95_ms (or, with options.classes, each class under its own budget,
  rows of one batch at their classes' points); 'fixed' serves one point (threshold /
  max_layers, else the run's operating point). After the timed replay (options.quality),
  every request is decoded again at full depth (untimed) for the fraction of served bytes
  identical to full-depth greedy output.

  mode='exact' serves self-speculative decoding (full-depth output by construction; the
  controller is fixed; draft_layer / draft_len default to the automatic choice for a batch
  of `slots`); its quality pass re-decodes with the threshold-mode engine at full depth."""
  o = options
  o.validate()
  if out is not None:  # checked now, not after the replay
    run_lib.check_output_dir(out, '--out', ('summary.json', 'requests.jsonl'),
                             'the output of a serve run')
  requests_t = trace_lib.load(trace)  # a bad trace fails before the model loads
  st = prepare(workdir, o, log, controller_kwargs)
  spec, variables, points, ops, engine = st.spec, st.variables, st.points, st.ops, st.engine
  draft_layer, draft_len = st.draft_layer, st.draft_len
  check_generated_trace(trace, spec.model.max_len)
  budget_s = None if o.slo_p95_ms is None else o.slo_p95_ms / 1e3
  ctl = st.classes if o.classes else next(iter(st.classes.values()))
  requests = heldout_prompts(spec, requests_t)
  ok = [r for r in requests if check_request(r, spec.model.max_len) is None]
  if not ok:  # a bad request is refused alone; a trace of nothing but bad ones is an error
    raise ConfigError(f'--trace={trace}: all {len(requests)} requests would be refused, '
                      f'e.g. request 0: {check_request(requests[0], spec.model.max_len)}')
  secs = engine.warmup(ops[0])
  if st.shadow is not None:
    warm_shadow(st.shadow, spec, log)
  log(f'{trace_lib.describe(trace)}: {len(requests)} requests; {o.slots} slots, compiled in '
      f'{secs:.1f}s; replaying ...')
  t_replay = time.perf_counter()
  result = replay(engine, requests, ops, ctl, static_batches=o.static_batches, log=log,
                  shadow=st.shadow)
  t_replay = time.perf_counter() - t_replay
  end = max([r.done_s for r in result['records'] if r.done_s is not None] or [0.0])
  first = next(iter(st.classes.values()))
  time_at = first.time_at_points(end) if hasattr(first, 'time_at_points') else None
  agree = None
  if o.quality:
    log('decoding every request again at full depth (untimed) ...')
    ref = engine if o.mode == 'threshold' else Engine(spec, variables, o.slots, o.kv_fill,
                                                       o.compact, o.steps_per_call,
                                                       prefill_chunk=o.prefill_chunk)
    full = replay(ref, requests, [OperatingPoint.full_depth()], realtime=False)
    agree = agreement(result['records'], full['records'])
  summary = summarize(result, budget_s, points, time_at, agree,
                      st.budgets if o.classes else None)
  summary.update(workdir=os.path.abspath(workdir), trace=trace, controller=o.controller,
                 slots=o.slots, compact=o.compact, kv_fill=o.kv_fill,
                 steps_per_call=o.steps_per_call, static_batches=o.static_batches, mode=o.mode,
                 draft_layer=draft_layer, draft_len=draft_len,
                 latency_classes=list(o.classes),
                 prefill_chunk=o.prefill_chunk,
                 points=[dataclasses.asdict(p) for p in points])
  if st.shadow is not None:
    summary['drift'] = st.shadow.summary(t_replay)
  table = exit_latency_table(result['steps'], spec.model.num_layers)
  summary['exit_latency'] = table
  if out is None:
    out = os.path.join(workdir, time.strftime('serve-%Y%m%d-%H%M%S'))
    while os.path.exists(out):
      out += '_'
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'requests.jsonl'), 'w') as f:
    for i, r in enumerate(result['records']):
      row = r.as_json(spec.model.num_layers)
      if agree is not None:
        row['agreement_with_full_depth'] = agree[i]
      f.write(json.dumps(row) + '\n')
  with open(os.path.join(out, 'steps.jsonl'), 'w') as f:
    for s in result['steps']:
      f.write(json.dumps(s) + '\n')
  if st.shadow is not None:  # what calibrate --from_serving re-certifies from
    monitor_lib.write_jsonl(st.shadow, os.path.join(out, SHADOW_LOG))
  run_lib.write_json(os.path.join(out, 'summary.json'), summary, default=json_default)
  plot([r.as_json(spec.model.num_layers) for r in result['records']], result['steps'],
       [p.label or str(i) for i, p in enumerate(points)], o.slo_p95_ms,
       os.path.join(out, 'serve.png'), summary.get('drift'))
  summary['out'] = out
  summary['text'] = format_summary(summary, table)
  log(summary['text'])
  log(f'wrote {out}/requests.jsonl, steps.jsonl, summary.json, serve.png')
  return summary
