"""Load from real clients: a request trace sent over HTTP to the server, open loop.

Each request of the trace (act_jax/serve/trace.py: poisson:, bursty: or JSONL) is sent at its
arrival time whether or not earlier ones have finished (open loop: the load does not slow
down when the server does), over at most `concurrency` connections (httpx.AsyncClient). A
request that waits for a connection waits on the client's clock: its latency counts from
its scheduled arrival. Requests stream (server-sent events), so the client sees its first
byte when it arrives.

Per request the client measures latency (arrival to the last event) and time to first byte
(arrival to the first event with text), and reads the server's own figures from the last
event (`act_jax.latency_s`, `ttfb_s`: from the engine thread's arrival to its last / first
byte). Their difference is what HTTP, the event loop and the client add. Prompts are the
serve binary's (serving.heldout_prompts on the run's held-out data), so a load run and an
in-process replay of the same trace serve the same requests.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, Callable, Optional, Sequence

import httpx
import numpy as np

from act_jax.serve.scheduler import Request

PERCENTILES = (50, 95, 99)


@dataclasses.dataclass
class Result:
  """One request as the client saw it (times in seconds from its scheduled arrival)."""
  id: int
  cls: str
  status: int = 0
  latency_s: Optional[float] = None
  ttfb_s: Optional[float] = None
  server_latency_s: Optional[float] = None
  server_ttfb_s: Optional[float] = None
  bytes: int = 0
  mean_layers: Optional[float] = None
  error: Optional[str] = None


def text_of(prompt: Sequence[int]) -> str:
  """A prompt's text: its bytes (special tokens, such as a held-out window's BOS, dropped:
  an HTTP prompt is text)."""
  return bytes(t for t in prompt if t < 256).decode('utf-8', 'replace')


def as_text_requests(requests: Sequence[Request]) -> list[Request]:
  """The requests with the prompts a client sends (text_of, re-encoded): what the server
  receives, so an in-process replay of these serves the same bytes."""
  return [dataclasses.replace(r, prompt=list(text_of(r.prompt).encode('utf-8')))
          for r in requests]


async def _one(client: httpx.AsyncClient, r: Request, t0: float, sem: asyncio.Semaphore
               ) -> Result:
  out = Result(r.id, r.cls)
  await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
  start = t0 + r.arrival_s
  body = {'prompt': text_of(r.prompt), 'max_tokens': r.max_new, 'stream': True}
  if r.cls:
    body['latency_class'] = r.cls
  async with sem:
    try:
      async with client.stream('POST', '/v1/completions', json=body) as resp:
        out.status = resp.status_code
        if resp.status_code != 200:
          out.error = json.loads(await resp.aread()).get('error', {}).get('message')
          return out
        async for line in resp.aiter_lines():
          if not line.startswith('data: ') or line == 'data: [DONE]':
            continue
          chunk = json.loads(line[6:])
          if 'error' in chunk:
            out.error = chunk['error']['message']
            break
          if out.ttfb_s is None and chunk['choices'][0]['text']:
            out.ttfb_s = time.perf_counter() - start
          tele = chunk.get('act_jax')
          if tele:
            out.latency_s = time.perf_counter() - start
            out.server_latency_s, out.server_ttfb_s = tele['latency_s'], tele['ttfb_s']
            out.bytes, out.mean_layers = len(tele['token_ids']), tele['mean_layers']
            if out.ttfb_s is None:  # every byte so far was a special token or a split char
              out.ttfb_s = out.latency_s
    except httpx.HTTPError as e:
      out.error = f'{type(e).__name__}: {e}'
  return out


async def _run(url: str, requests: Sequence[Request], concurrency: int,
               timeout_s: float) -> list[Result]:
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter() + 0.05
    return await asyncio.gather(*(_one(client, r, t0, sem) for r in requests))


def send(url: str, requests: Sequence[Request], concurrency: int = 64,
         timeout_s: float = 600.0) -> list[Result]:
  """Sends every request at its arrival time (open loop); returns what the client saw."""
  return asyncio.run(_run(url.rstrip('/'), requests, concurrency, timeout_s))


def wait_ready(url: str, timeout_s: float = 300.0, alive: Callable[[], bool] = lambda: True,
               why: Callable[[], str] = lambda: '') -> None:
  """Polls GET /healthz until it says 200; RuntimeError if `alive()` turns False (a server
  process that exited: `why()` says what it printed) or after timeout_s."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if not alive():
      raise RuntimeError(f'the server exited before it was ready: {why()}')
    try:
      if httpx.get(f'{url.rstrip("/")}/healthz').status_code == 200:
        return
    except httpx.TransportError:
      pass
    time.sleep(0.2)
  raise RuntimeError(f'{url} was not ready after {timeout_s:g}s')


def _pcts(xs: Sequence[float]) -> dict[str, Optional[float]]:
  a = np.asarray([x for x in xs if x is not None], np.float64)
  return {f'p{q}': (1e3 * float(np.percentile(a, q)) if len(a) else None) for q in PERCENTILES}


def summarize(results: Sequence[Result]) -> dict[str, Any]:
  """Client and server percentiles (ms), overall and per latency class."""
  def block(rs: Sequence[Result]) -> dict[str, Any]:
    ok = [r for r in rs if r.status == 200 and r.error is None and r.latency_s is not None]
    gap = [r.latency_s - r.server_latency_s for r in ok]
    return {'sent': len(rs), 'served': len(ok),
            'refused': sum(1 for r in rs if r.status not in (0, 200)),
            'failed': sum(1 for r in rs if r.status == 200 and r.error or r.status == 0),
            'latency_ms': _pcts([r.latency_s for r in ok]),
            'ttfb_ms': _pcts([r.ttfb_s for r in ok]),
            'server_latency_ms': _pcts([r.server_latency_s for r in ok]),
            'server_ttfb_ms': _pcts([r.server_ttfb_s for r in ok]),
            'client_minus_server_ms': _pcts(gap),
            'mean_layers': (float(np.mean([r.mean_layers for r in ok
                                           if r.mean_layers is not None]))
                            if any(r.mean_layers is not None for r in ok) else None)}
  out = block(results)
  classes = sorted({r.cls for r in results if r.cls})
  if classes:
    out['classes'] = {c: block([r for r in results if r.cls == c]) for c in classes}
  return out


def format_summary(s: dict[str, Any], budgets: Optional[dict[str, float]] = None) -> str:
  f = lambda v: '-' if v is None else f'{v:.0f}'  # noqa: E731
  rows = [('all', s)] + list(s.get('classes', {}).items())
  lines = [f'sent {s["sent"]}, served {s["served"]}, refused {s["refused"]}, failed '
           f'{s["failed"]}',
           '| class | served | latency p50 / p95 / p99 ms (client) | (server) | first byte '
           'p50 / p95 ms (client) | (server) | mean layers |',
           '|---|---|---|---|---|---|---|']
  for name, b in rows:
    lat, slat, tt, stt = (b['latency_ms'], b['server_latency_ms'], b['ttfb_ms'],
                          b['server_ttfb_ms'])
    ml = '-' if b['mean_layers'] is None else f'{b["mean_layers"]:.2f}'
    lines.append(f'| {name} | {b["served"]} | {f(lat["p50"])} / {f(lat["p95"])} / '
                 f'{f(lat["p99"])} | {f(slat["p50"])} / {f(slat["p95"])} / {f(slat["p99"])} | '
                 f'{f(tt["p50"])} / {f(tt["p95"])} | {f(stt["p50"])} / {f(stt["p95"])} | '
                 f'{ml} |')
  return '\n'.join(lines)


__all__ = ['Result', 'as_text_requests', 'format_summary', 'send', 'summarize', 'text_of',
           'wait_ready']
