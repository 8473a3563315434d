"""Serving benchmarks, side by side in one process (what `experiments.benchmark_serving` runs).

1. Decode efficiency: every slot busy, `steps` decode steps per operating point, points timed
   round-robin; efficiency = (full-depth ms / point ms) / (L / mean layers), 1 = the wall
   clock falls as fast as the layers do. At batch = slots and batch 1, waiting for the
   slowest row and compacted.
2. The SLO controller under a bursty trace whose peak is above the full-depth capacity
   (both capacities measured closed loop, prefills included, unless a trace is given):
   fixed full depth vs the controller, p95, the share of requests within budget, agreement
   with full-depth greedy inside / outside bursts.
Generated traces are decode-heavy by default (prompts of 8-24 bytes, 48-96 bytes out): on
a CPU a prefill costs the same whatever the point, and early exit does not shorten it.
3. Continuous batching vs static batches (wait for a full batch, run it to its longest
   request) at the same Poisson load: bytes/s and p95.
4-6. prefill (alone vs batched and chunked), classes (latency classes on a mixed bursty
   trace) and http (the same over HTTP with the load generator): act_jax/bench/server.py.
7. drift: a trace that switches domain, the fixed certified point with and without the drift
   monitor (act_jax/bench/drift.py).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from act_jax.bench import drift as drift_bench
from act_jax.bench import server as server_bench
from act_jax.calibrate import operating_point
from act_jax.errors import ConfigError
from act_jax.run import directory as run_lib
from act_jax.serve import engine as serve_engine
from act_jax.serve import scheduler
from act_jax.serve import serving, slo
from act_jax.serve import summary as serve_summary
from act_jax.serve import trace as trace_lib
from act_jax.spec import NEVER_EXIT, OperatingPoint

PARTS = ('efficiency', 'bursty', 'batching') + server_bench.PARTS + ('drift',)


def decode_efficiency(engine: serve_engine.Engine, prompts: Sequence[Sequence[int]],
                      points: Sequence[OperatingPoint], steps: int = 32, repeats: int = 3
                      ) -> list[dict]:
  """Per point: median ms per decode step with every slot busy, mean layers, efficiency."""
  b = engine.slots
  times: list[list[float]] = [[] for _ in points]
  layers: list[list[float]] = [[] for _ in points]
  for rep in range(repeats + 1):  # round 0 compiles and warms up
    for k, point in enumerate(points):
      tok = np.asarray([engine.prefill(s, prompts[s % len(prompts)], point)[0]
                        for s in range(b)], np.int32)
      pos = np.asarray([len(prompts[s % len(prompts)]) for s in range(b)], np.int32)
      lay = []
      jax.block_until_ready(engine.cache)
      per = engine.steps_per_call
      t = time.perf_counter()
      for _ in range(steps // per):
        out = engine.step(tok, pos, point)  # returns numpy: each call is synchronous
        tok, pos = out['next'][-1], pos + per
        lay.append(out['layers'])
      if rep:
        times[k].append((time.perf_counter() - t) / (steps // per * per))
        layers[k].append(float(np.mean(lay)))
  full_l = engine.spec.model.num_layers
  ms = [1e3 * float(np.median(t)) for t in times]
  rows = []
  for k, point in enumerate(points):
    ml = float(np.mean(layers[k]))
    speed = ms[0] / ms[k]
    rows.append({'point': point.label, 'batch': b, 'compact': engine.compact,
                 'kv_fill': engine.kv_fill, 'steps_per_call': engine.steps_per_call,
                 'ms_per_step': ms[k], 'mean_layers': ml, 'speedup': speed,
                 'layer_ratio': full_l / ml, 'efficiency': speed / (full_l / ml)})
  return rows


def format_efficiency(rows: Sequence[dict]) -> str:
  lines = ['| batch | rows | KV fill | point | ms / step | mean layers | speedup | L / layers | '
           'efficiency |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["batch"]} | {"compacted" if r["compact"] else "wait for slowest"} | '
                 f'{r["kv_fill"]} | '
                 f'{r["point"]} | {r["ms_per_step"]:.2f} | {r["mean_layers"]:.2f} | '
                 f'{r["speedup"]:.2f}x | {r["layer_ratio"]:.2f}x | {r["efficiency"]:.2f} |')
  return '\n'.join(lines)


def format_side_by_side(named: Sequence[tuple[str, dict]]) -> str:
  f = lambda v, fmt='{:.0f}': '-' if v is None else fmt.format(v)  # noqa: E731
  lines = ['| run | served | p50 ms | p95 ms | p99 ms | within budget | bytes/s | '
           'mean layers | agreement (burst / base) |', '|---|---|---|---|---|---|---|---|---|']
  for name, s in named:
    ph = s.get('phases', {})
    ag = ' / '.join(f(ph.get(k, {}).get('agreement_with_full_depth'), '{:.1%}')
                    for k in ('burst', 'base')) if ph else '-'
    lines.append(f'| {name} | {s["served"]} | {f(s["latency_ms"]["p50"])} | '
                 f'{f(s["latency_ms"]["p95"])} | {f(s["latency_ms"]["p99"])} | '
                 f'{f(s.get("met_fraction"), "{:.1%}")} | {f(s["bytes_per_s"])} | '
                 f'{f(s["mean_layers"], "{:.2f}")} | {ag} |')
  return '\n'.join(lines)


def benchmark(workdir: str, trace: Optional[str] = None, slo_p95_ms: Optional[float] = None,
              slots: int = 8, duration_s: float = 60.0, peak_over_capacity: float = 1.25,
              base_over_capacity: float = 0.3, steady_load: float = 0.7,
              allow_uncertified: bool = False, efficiency_points: Sequence[OperatingPoint] = (),
              kv_fill: str = 'project', steps_per_call: int = 4,
              parts: Sequence[str] = PARTS, prompt_len: str = '8-24', new_len: str = '48-96',
              log: Callable[[str], None] = print) -> dict:
  """Runs the benchmarks of the module docstring (`parts` of PARTS); returns their tables."""
  bad = sorted(set(parts) - set(PARTS))
  if bad or not parts:
    raise ConfigError(f'--parts={",".join(parts)}: allowed: {", ".join(PARTS)}')
  if trace is not None:
    trace_lib.load(trace)  # a bad trace fails now, not after minutes of measuring
  drift = None
  if 'drift' in parts:  # its own trace and calibrated copy: needs no capacity measurement
    log('7. drift: a domain switch, the fixed certified point with and without the monitor')
    drift = drift_bench.drift_part(workdir, duration_s=1.5 * duration_s, slots=slots,
                                   steps_per_call=steps_per_call, log=log)
    if set(parts) == {'drift'}:
      return {'drift': drift}
  spec, variables, step = run_lib.load(workdir)
  points = serving.load_points(workdir, spec)
  usable = [p for p in points if p.certified or allow_uncertified]
  ops = [OperatingPoint(p.threshold, p.max_layers) for p in points]
  if not efficiency_points:  # full depth and up to 3 usable points, the cheapest included
    cheaper = usable[1:]
    pick = sorted({round(k * (len(cheaper) - 1) / 2) for k in range(3)}) if cheaper else []
    efficiency_points = [OperatingPoint(cheaper[k].threshold, cheaper[k].max_layers)
                         for k in pick]
  eff_points = [ops[0]] + [p.validate(spec, 'efficiency point') for p in efficiency_points]
  probe = trace_lib.generate('poisson', rate=1.0, duration=64.0, seed=1, prompt=prompt_len,
                             new=new_len)
  prompts = [r.prompt for r in serving.heldout_prompts(spec, probe)][:max(slots, 8)]
  if 'efficiency' in parts:
    log(f'1. decode efficiency: {len(eff_points)} points, {slots} slots and 1, eager and '
        f'lazy KV fill ...')
  eff = []
  for b, compact, fill in ((1, False, 'project'), (1, False, 'lazy'),
                           (slots, False, 'project'), (slots, False, 'lazy'),
                           (slots, True, 'project'), (slots, True, 'lazy')):
    if 'efficiency' not in parts:
      break
    eng = serve_engine.Engine(spec, variables, b, kv_fill=fill, compact=compact,
                              steps_per_call=steps_per_call)
    eff += decode_efficiency(eng, prompts, eff_points)
    log(format_efficiency(eff[-len(eff_points):]))
  eng = serve_engine.Engine(spec, variables, slots, kv_fill=kv_fill, steps_per_call=steps_per_call)
  # Capacity, closed loop: every probe request waiting at once (prefills included).
  closed = serving.heldout_prompts(spec, probe)
  eng.warmup(ops[0])
  cheapest = max(range(len(points)), key=lambda i: (points[i].certified or allow_uncertified,
                                                    -points[i].mean_layers))
  caps = {0: 0.0, cheapest: 0.0}
  scheduler.replay(eng, closed, ops[:1], realtime=False)  # warm (first-run allocations)
  for _ in range(2):  # alternated, best of two: this machine is shared and noisy
    for i in caps:
      t = time.perf_counter()
      scheduler.replay(eng, closed, [ops[i]], realtime=False)
      caps[i] = max(caps[i], len(closed) / (time.perf_counter() - t))
  capacity = caps[0]
  t = time.perf_counter()
  for r in closed[:8]:  # one request alone: the latency floor
    scheduler.replay(eng, [r], ops[:1], realtime=False)
  lone_s = (time.perf_counter() - t) / 8
  if slo_p95_ms is None:  # 3x a lone full-depth request's latency
    slo_p95_ms = 3e3 * lone_s
  if trace is None:  # peak above the full-depth capacity, below the cheapest point's
    peak = min(peak_over_capacity * capacity, 0.95 * caps[cheapest])
    trace = (f'bursty:base={base_over_capacity * capacity:.2f},peak={peak:.2f},'
             f'duration={duration_s:g}s,period=25s,burst=10s,seed=0,prompt={prompt_len},'
             f'new={new_len}')
  log(f'capacity (closed loop, {slots} slots): full depth {capacity:.1f} requests/s, cheapest '
      f'usable point {points[cheapest].label} {caps[cheapest]:.1f}; a lone request takes '
      f'{1e3 * lone_s:.0f} ms; trace {trace}; budget p95 {slo_p95_ms:.0f} ms')
  budget_s = slo_p95_ms / 1e3
  reqs = serving.heldout_prompts(spec, trace_lib.load(trace))
  eng.warmup(ops[0])
  named, batching = [], []
  if 'bursty' in parts:
    named = _bursty(eng, reqs, points, ops, budget_s, allow_uncertified, log)
  rate = steady_load * capacity
  steady = (f'poisson:rate={rate:.2f},duration={duration_s / 2:g}s,seed=1,prompt={prompt_len},'
            f'new={new_len}')
  if 'batching' in parts:
    batching = _batching(spec, eng, steady, points, ops, budget_s, steady_load, log)
  extra: dict = {}
  if 'prefill' in parts:
    log('4. prefill alone vs batched and chunked ...')
    extra['prefill'] = server_bench.prefill_part(spec, variables, ops, slots, steady_load,
                                                 log=log)
  # a mixed trace for the latency classes: bursts 15 % above the full-depth capacity (where
  # everyone at full depth queues and misses the interactive budget), half interactive
  mixed = (f'bursty:base={base_over_capacity * capacity:.2f},peak={1.15 * capacity:.2f},'
           f'duration={duration_s:g}s,period=25s,burst=10s,seed=7,prompt={prompt_len},'
           f'new={new_len},interactive=0.5')
  budgets = {'interactive': budget_s, 'batch': 10 * budget_s}
  if 'classes' in parts:
    log('5. latency classes ...')
    extra['classes'] = server_bench.classes_part(spec, variables, points, ops, slots, mixed,
                                                 budgets, allow_uncertified, steps_per_call,
                                                 log)
  if 'http' in parts:
    log('6. the same over HTTP ...')
    extra['http'] = server_bench.http_part(workdir, spec, variables, points, ops, slots, mixed,
                                           budgets, allow_uncertified, steps_per_call, log=log)
  if drift is not None:
    extra['drift'] = drift
  return {**extra, 'efficiency': eff, 'capacity_rps': capacity,
          'capacity_cheapest_rps': caps[cheapest], 'lone_request_ms': 1e3 * lone_s,
          'trace': trace, 'slo_p95_ms': slo_p95_ms, 'bursty': dict(named),
          'batching': dict(batching), 'steady_trace': steady}


def _bursty(eng, reqs, points, ops, budget_s, allow_uncertified, log):
  log('2. bursty trace: fixed full depth, then the SLO controller ...')
  runs = {}
  fixed = slo.FixedController([points[0]])
  runs['fixed full depth'] = (scheduler.replay(eng, reqs, ops[:1], fixed), fixed, ops[:1])
  ctl = slo.SLOController(points, budget_s, allow_uncertified=allow_uncertified)
  runs['SLO controller'] = (scheduler.replay(eng, reqs, ops, ctl), ctl, ops)
  full = scheduler.replay(eng, reqs, ops[:1], realtime=False)
  named = []
  for name, (res, c, pts) in runs.items():
    end = max([r.done_s for r in res['records'] if r.done_s is not None] or [0.0])
    agree = serve_summary.agreement(res['records'], full['records'])
    s = serve_summary.summarize(res, budget_s, points[:len(pts)], c.time_at_points(end), agree)
    named.append((name, s))
  log(format_side_by_side(named))
  ctl_summary = named[1][1]
  log('time at each point (controller): ' + ', '.join(
      f'{k}: {v:.1f}s' for k, v in ctl_summary.get('time_at_points_s', {}).items()))
  return named


def _batching(spec, eng, steady, points, ops, budget_s, steady_load, log):
  log(f'3. continuous vs static batches at {steady_load:.0%} of capacity ({steady}), '
      f'full depth ...')
  sreqs = serving.heldout_prompts(spec, trace_lib.load(steady))
  eng.warmup(ops[0])
  batching = []
  for name, static in (('continuous batching', False), ('static batches', True)):
    res = scheduler.replay(eng, sreqs, ops[:1], static_batches=static)
    batching.append((name, serve_summary.summarize(res, budget_s, points[:1])))
  log(format_side_by_side(batching))
  return batching


def kv_fill_efficiency(spec, variables: dict, caps: Sequence[int], new_tokens: int = 64,
                       repeats: int = 5, fills: Sequence[str] = ('project', 'lazy'),
                       log: Callable[[str], None] = print) -> list[dict]:
  """Batch-1 greedy decoding (inference.generate) at depth caps, eager vs lazy KV fill, each
  against full depth timed in the same round-robin (operating_point.time_decode). A cap
  with threshold 1.0 makes every token exit exactly there: the fill cost of (L - cap)
  skipped layers per token, whatever the weights (no training needed)."""
  prompt = operating_point.eval_prompts(spec, 1, 16)
  full_l = spec.model.num_layers
  rows = []
  for cap in caps:
    runs = {f: [] for f in fills}
    for _ in range(repeats + 1):  # fills interleaved round by round; round 0 compiles
      for fill in fills:
        runs[fill].append(operating_point.time_decode(
            spec, variables, prompt, [NEVER_EXIT, 1.0], new_tokens, repeats=1, kv_fill=fill,
            max_layers=cap))
    for fill in fills:
      full = float(np.median([r['ms_per_token'][0] for r in runs[fill][1:]]))
      ms = float(np.median([r['ms_per_token'][1] for r in runs[fill][1:]]))
      ml = runs[fill][-1]['mean_layers'][1]
      rows.append({'cap': cap, 'kv_fill': fill, 'full_ms': full, 'ms': ms, 'mean_layers': ml,
                   'speedup': full / ms, 'layer_ratio': full_l / ml,
                   'efficiency': (full / ms) / (full_l / ml)})
      log(f'cap {cap} {fill}: {ms:.3f} ms/token vs full depth {full:.3f}')
  return rows


def format_kv_fill(rows: Sequence[dict]) -> str:
  lines = ['| cap (layers run) | KV fill | full depth ms/token | capped ms/token | speedup | '
           'L / layers | efficiency |', '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["cap"]} ({r["mean_layers"]:.1f}) | {r["kv_fill"]} | {r["full_ms"]:.3f} '
                 f'| {r["ms"]:.3f} | {r["speedup"]:.2f}x | {r["layer_ratio"]:.2f}x | '
                 f'{r["efficiency"]:.2f} |')
  return '\n'.join(lines)
