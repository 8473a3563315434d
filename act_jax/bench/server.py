"""Benchmarks of the HTTP server's pieces, side by side in one process (the 'prefill',
'classes' and 'http' parts of `experiments.benchmark_serving`).

* prefill: a prompt-heavy Poisson load at `load` x the full-depth capacity (closed loop, this
  prompt mix), served twice on the same requests: each prompt prefilled alone and whole
  before the next decode step (how serving worked before), and batched in chunks of
  `chunk` tokens. Time to first byte and latency percentiles, and the most prompt tokens a
  decode step waited for.
* classes: a bursty trace, half 'interactive' (tight p95 budget), half 'batch' (loose), served
  three ways: everyone at full depth; everyone under one SLO controller at the interactive
  budget; two latency classes, each under its own controller (rows of one batch at their
  classes' points). Per class: p95, the share within its budget, mean layers, agreement with
  full-depth greedy.
* http: the latency-classes run again through the HTTP server (the `serve --listen` binary,
  its own process), its requests sent by the load generator (act_jax/bench/loadgen.py) over
  real connections: client and server percentiles next to the in-process replay's, and the
  programs compiled while serving (0 expected).
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import httpx

from act_jax.bench import loadgen
from act_jax.serve import engine as serve_engine
from act_jax.serve import scheduler, serving, slo
from act_jax.serve import summary as serve_summary
from act_jax.serve import trace as trace_lib
from act_jax.spec import OperatingPoint, Spec

PARTS = ('prefill', 'classes', 'http')


def _closed_capacity(eng: serve_engine.Engine, reqs: Sequence[scheduler.Request],
                     op: OperatingPoint, **kw: Any) -> float:
  """Requests/s with every request waiting at once (best of two)."""
  best = 0.0
  scheduler.replay(eng, reqs, [op], realtime=False, **kw)  # warm
  for _ in range(2):
    t = time.perf_counter()
    scheduler.replay(eng, reqs, [op], realtime=False, **kw)
    best = max(best, len(reqs) / (time.perf_counter() - t))
  return best


def prefill_part(spec: Spec, variables: Any, ops: Sequence[OperatingPoint], slots: int,
                 load: float = 0.7, chunk: int = 64, duration_s: float = 40.0,
                 prompt: str | None = None, new: str = '8-24',
                 log: Callable[[str], None] = print) -> dict:
  """Prefill alone vs batched and chunked at the same load (module docstring). Prompts
  default to 40-96 bytes, cut so that every request fits the context."""
  if prompt is None:
    hi = min(96, spec.model.max_len - int(new.split('-')[-1]))
    prompt = f'{min(40, hi)}-{hi}'
  serving.check_generated_trace(f'poisson:rate=1,duration=1,prompt={prompt},new={new}',
                                spec.model.max_len)
  probe = serving.heldout_prompts(spec, trace_lib.generate(
      'poisson', rate=1.0, duration=4.0 * slots, seed=5, prompt=prompt, new=new))
  before = serve_engine.Engine(spec, variables, slots, prefill_chunk=0)
  after = serve_engine.Engine(spec, variables, slots, prefill_chunk=chunk)
  for e in (before, after):
    e.warmup(ops[0])
  capacity = _closed_capacity(before, probe, ops[0], prefill_batch=False)
  rate = load * capacity
  text = f'poisson:rate={rate:.2f},duration={duration_s:g}s,seed=6,prompt={prompt},new={new}'
  reqs = serving.heldout_prompts(spec, trace_lib.load(text))
  log(f'prefill: full-depth capacity (alone, whole prompts) {capacity:.2f} requests/s; '
      f'{text} ({load:.0%}) ...')
  rows = {}
  for name, eng, batch in (('alone, whole prompts', before, False),
                           (f'batched, chunks of {chunk}', after, True)):
    res = scheduler.replay(eng, reqs, ops[:1], prefill_batch=batch)
    s = serve_summary.summarize(res, None, [])
    s['max_prefill_tokens_per_step'] = max((st['prefill_tokens'] for st in res['steps']),
                                           default=0)
    s['max_prefill_row_tokens_per_step'] = max(
        (st['prefill_row_tokens'] for st in res['steps']), default=0)
    rows[name] = s
  names = list(rows)
  ratio = rows[names[1]]['ttfb_ms']['p95'] / rows[names[0]]['ttfb_ms']['p95']
  log(format_prefill(rows, ratio))
  return {'trace': text, 'capacity_rps': capacity, 'load': load, 'runs': rows,
          'ttfb_p95_ratio': ratio}


def format_prefill(rows: dict, ratio: float) -> str:
  f = lambda v: '-' if v is None else f'{v:.0f}'  # noqa: E731
  lines = ['| prefill | first byte p50 / p95 ms | latency p50 / p95 ms | bytes/s | most prompt '
           'tokens a decode step waited for (all rows / one row) |', '|---|---|---|---|---|']
  for name, s in rows.items():
    lines.append(f'| {name} | {f(s["ttfb_ms"]["p50"])} / {f(s["ttfb_ms"]["p95"])} | '
                 f'{f(s["latency_ms"]["p50"])} / {f(s["latency_ms"]["p95"])} | '
                 f'{f(s["bytes_per_s"])} | {s["max_prefill_tokens_per_step"]} / '
                 f'{s["max_prefill_row_tokens_per_step"]} |')
  lines.append(f'p95 time to first byte, batched / alone: {ratio:.2f}x')
  return '\n'.join(lines)


def _class_runs(points: Sequence[slo.Point], budgets: dict, allow_uncertified: bool
                ) -> dict[str, Any]:
  """The three ways of serving the mixed trace: name -> controller(s) for replay."""
  tight = budgets['interactive']
  new = lambda b: slo.SLOController(points, b, allow_uncertified=allow_uncertified)  # noqa
  return {'everyone at full depth': slo.FixedController(points),
          'one SLO controller (interactive budget)': new(tight),
          'latency classes': {'interactive': new(tight), 'batch': new(budgets['batch'])}}


def classes_part(spec: Spec, variables: Any, points: Sequence[slo.Point],
                 ops: Sequence[OperatingPoint], slots: int, trace: str, budgets: dict,
                 allow_uncertified: bool = False, steps_per_call: int = 4,
                 log: Callable[[str], None] = print) -> dict:
  """Fixed full depth vs one controller vs latency classes on one mixed trace."""
  eng = serve_engine.Engine(spec, variables, slots, steps_per_call=steps_per_call)
  eng.warmup(ops[0])
  reqs = serving.heldout_prompts(spec, trace_lib.load(trace))
  full = scheduler.replay(eng, reqs, ops[:1], realtime=False)
  log(f'classes: {trace}; budgets p95 interactive {1e3 * budgets["interactive"]:.0f} ms, '
      f'batch {1e3 * budgets["batch"]:.0f} ms ...')
  rows = {}
  for name, ctl in _class_runs(points, budgets, allow_uncertified).items():
    res = scheduler.replay(eng, reqs, ops if name != 'everyone at full depth' else ops[:1],
                           ctl)
    agree = serve_summary.agreement(res['records'], full['records'])
    s = serve_summary.summarize(res, None, points, None, agree, budgets)
    for c in s['classes']:  # agreement per class
      a = [(x, len(r.tokens)) for x, r in zip(agree, res['records'])
           if x is not None and (r.cls or 'interactive') == c]
      s['classes'][c]['agreement_with_full_depth'] = (
          sum(x * n for x, n in a) / sum(n for _, n in a) if a else None)
    rows[name] = s
  log(format_classes(rows))
  return {'trace': trace, 'budgets_ms': {k: 1e3 * v for k, v in budgets.items()}, 'runs': rows}


def format_classes(rows: dict) -> str:
  f = lambda v, fmt='{:.0f}': '-' if v is None else fmt.format(v)  # noqa: E731
  lines = ['| run | class | served | p50 ms | p95 ms | budget ms | within budget | mean layers '
           '| agreement |', '|---|---|---|---|---|---|---|---|---|']
  for name, s in rows.items():
    for c, d in s['classes'].items():
      lines.append(f'| {name} | {c} | {d["served"]} | {f(d["latency_p50_ms"])} | '
                   f'{f(d["latency_p95_ms"])} | {f(d["slo_p95_ms"])} | '
                   f'{f(d["met_fraction"], "{:.1%}")} | {f(d["mean_layers"], "{:.2f}")} | '
                   f'{f(d.get("agreement_with_full_depth"), "{:.1%}")} |')
  return '\n'.join(lines)


def http_part(workdir: str, spec: Spec, variables: Any, points: Sequence[slo.Point],
              ops: Sequence[OperatingPoint], slots: int, trace: str, budgets: dict,
              allow_uncertified: bool = False, steps_per_call: int = 4,
              concurrency: int = 256, log: Callable[[str], None] = print) -> dict:
  """The latency-classes run over HTTP next to the same run in process. The server is the
  `serve --listen` binary in its own process and the load generator runs here: in one
  process, the client's and the server's Python would share one interpreter lock."""
  reqs = loadgen.as_text_requests(serving.heldout_prompts(spec, trace_lib.load(trace)))
  eng = serve_engine.Engine(spec, variables, slots, steps_per_call=steps_per_call)
  eng.warmup(ops[0])
  ctl = _class_runs(points, budgets, allow_uncertified)['latency classes']
  replayed = serve_summary.summarize(scheduler.replay(eng, reqs, ops, ctl), None, points,
                                     class_budgets=budgets)
  del eng
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  cmd = [sys.executable, '-m', 'experiments.serve', f'--workdir={workdir}',
         f'--listen=127.0.0.1:{port}', '--controller=slo', f'--slots={slots}',
         f'--steps_per_call={steps_per_call}',
         '--classes=' + ','.join(f'{c}={1e3 * b:.0f}' for c, b in budgets.items())]
  if allow_uncertified:
    cmd.append('--allow_uncertified')
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    loadgen.wait_ready(url, alive=lambda: proc.poll() is None,
                       why=lambda: proc.stderr.read()[-2000:])
    log(f'http: {len(reqs)} requests to {" ".join(cmd[2:])}, at most {concurrency} '
        f'connections ...')
    results = loadgen.send(url, reqs, concurrency)
    metrics = httpx.get(f'{url}/metrics').text
    compiles = int(float(next(line.split()[-1] for line in metrics.splitlines()
                              if line.startswith('act_jax_compiles_after_warmup '))))
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
  client = loadgen.summarize(results)
  log(loadgen.format_summary(client))
  log(format_http(client, replayed, compiles))
  return {'trace': trace, 'command': cmd[2:], 'client': client, 'replay': replayed,
          'compiles_while_serving': compiles}


def format_http(client: dict, replayed: dict, compiles: int) -> str:
  f = lambda v: '-' if v is None else f'{v:.0f}'  # noqa: E731
  lines = ['| class | p50 / p95 ms, HTTP client | server (engine thread) | in-process replay |',
           '|---|---|---|---|']
  for c, b in client.get('classes', {}).items():
    r = replayed['classes'].get(c, {})
    lines.append(f'| {c} | {f(b["latency_ms"]["p50"])} / {f(b["latency_ms"]["p95"])} | '
                 f'{f(b["server_latency_ms"]["p50"])} / {f(b["server_latency_ms"]["p95"])} | '
                 f'{f(r.get("latency_p50_ms"))} / {f(r.get("latency_p95_ms"))} |')
  lines.append(f'programs compiled while serving: {compiles}')
  return '\n'.join(lines)


__all__ = ['PARTS', 'classes_part', 'http_part', 'prefill_part']
