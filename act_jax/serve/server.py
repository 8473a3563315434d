"""The HTTP inference server: an OpenAI-compatible completions API over the engine.

One engine thread owns the device: it runs the continuous-batching `Scheduler` (batched and
chunked prefill, per-row operating points for latency classes) in a loop, fed through a
thread-safe inbox. The ASGI app (Starlette, served by uvicorn) turns HTTP requests into
scheduler requests and streams their bytes back as the engine produces them.

  POST /v1/completions  {"prompt": str, "max_tokens": int = 16, "temperature": float = 0,
                         "seed": int = 0, "stream": bool = false, "stop": str | [str],
                         "latency_class": str, "operating_point": {"threshold": t,
                         "max_layers": n}}
      -> {"id", "object": "text_completion", "created", "model", "choices": [{"text",
          "index": 0, "finish_reason": "length" | "stop"}], "usage": {...},
          "act_jax": {"token_ids", "mean_layers", "exit_histogram", "latency_class",
                      "operating_points", "latency_s", "ttfb_s"}}
      stream=true: server-sent events, one `data: {...}` per engine call that produced
      bytes (text as UTF-8 decodes; a character split across calls waits for its last
      byte), a last event with finish_reason, then `data: [DONE]`.
  GET /metrics          Prometheus text (act_jax/serve/metrics.py)
  GET /healthz          200 {"status": "ready"} after warm-up; 503 while warming up/draining

Text is the model's bytes: a prompt is its UTF-8 bytes, and the completion's text their
decoding (specials dropped, invalid UTF-8 as U+FFFD); `act_jax.token_ids` has the exact ids.
Greedy output (temperature 0) is byte-identical to `inference.generate` of the request alone
(tests/test_server.py). A bad request gets a 4xx with a one-line JSON error and is refused
alone. SIGTERM drains: requests in flight finish, new ones get 503, then the process exits 0.
Everything the engine can meet (prefill buckets, the decode step) is compiled before
/healthz says ready; points and classes are traced values, so nothing compiles after.

Why Starlette + uvicorn: the smallest well-kept ASGI stack with streaming responses and a
test client; FastAPI would add pydantic for the dozen fields checked here by hand (with
error lines that name the field, as every act_jax input does). prometheus_client for the
exposition format.
"""
from __future__ import annotations

import asyncio
import codecs
import dataclasses
import itertools
import json
import queue
import threading
import time
from typing import Any, Callable, Optional, Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from act_jax.calibrate import counts as counts_lib
from act_jax.data import decode as decode_bytes
from act_jax.errors import ConfigError
from act_jax.serve import engine as engine_lib
from act_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from act_jax.serve.scheduler import Record, Request, Scheduler, check_request
from act_jax.spec import OperatingPoint, Spec

MAX_STOP = 4  # stop strings per request (as OpenAI's API)


@dataclasses.dataclass
class LatencyClass:
  """A latency class: its controller picks its rows' operating point; budget_s its p95."""
  name: str
  controller: Any
  budget_s: Optional[float]


class _Sink:
  """Where the engine thread delivers one request's bytes: an asyncio queue of the loop that
  waits for them."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop, self.queue = loop, asyncio.Queue()

  def put(self, item: tuple) -> None:
    self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
  """The engine thread: warm-up, then scheduler iterations while there is work."""

  def __init__(self, engine: engine_lib.Engine, points: Sequence[Any],
               ops: Sequence[OperatingPoint], classes: Sequence[LatencyClass],
               metrics: ServerMetrics, log: Callable[[str], None] = print,
               shadow: Any = None):
    self.engine, self.points, self.ops, self.metrics, self.log = (engine, points, ops, metrics,
                                                                  log)
    self.classes = {c.name: c for c in classes}
    self.scheduler = Scheduler(engine, ops, {c.name: c.controller for c in classes},
                               log=log, on_bytes=self._on_bytes, shadow=shadow)
    self.shadow = shadow  # monitor.Shadow (warmed up by the caller) or None
    self._shadow_seen = (0, 0, 0.0)  # rows, events, seconds already in the metrics
    if shadow is not None:
      metrics.monitor(shadow.labels)
    self.inbox: queue.SimpleQueue = queue.SimpleQueue()
    self.sinks: dict[int, _Sink] = {}
    self._seen: dict[int, tuple[int, dict, int]] = {}
    self._done: list[int] = []  # records to forget once the scheduler is through with them
    self.ready = threading.Event()
    self.stopped = threading.Event()
    self.error: Optional[str] = None
    self.t0 = time.perf_counter()
    self.lowerings_at_ready = 0
    self.ids = itertools.count()
    self.thread = threading.Thread(target=self._run, name='act_jax-engine', daemon=True)

  def now(self) -> float:
    return time.perf_counter() - self.t0

  def start(self) -> None:
    self.thread.start()

  def submit(self, r: Request, sink: _Sink) -> None:
    self.inbox.put(('submit', r, sink))

  def cancel(self, request_id: int) -> None:
    self.inbox.put(('cancel', request_id, None))

  @property
  def in_flight(self) -> int:
    return len(self.sinks)

  def _run(self) -> None:
    try:
      secs = self.engine.warmup(self.ops[0])
      self.lowerings_at_ready = engine_lib.lowerings()
      self.log(f'warm: every prefill bucket and the decode step compiled in {secs:.1f}s')
      self.metrics.ready.set(1)
      self.ready.set()
      sched = self.scheduler
      while not self.stopped.is_set():
        self._drain(block=not sched.busy)
        if sched.busy:
          sched.iterate(self.now)
          self._gauges()
          sched.steps.clear()  # a server keeps no per-step history (the metrics have it)
        self._forget()
    except Exception as e:  # a device failure: fail the requests in flight, say why
      self.error = f'{type(e).__name__}: {e}'
      self.log(f'engine stopped: {self.error}')
      self.metrics.ready.set(0)
      for sink in self.sinks.values():
        sink.put(([], True, f'engine error: {self.error}', None))
      self.sinks.clear()
      self.ready.set()

  def _drain(self, block: bool) -> None:
    try:
      item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      kind, a, sink = item
      if kind == 'submit':
        self.sinks[a.id] = sink
        a.arrival_s = self.now()
        self.scheduler.submit(a)
      elif kind == 'cancel' and a in self.sinks:
        self.metrics.requests.labels(self._cls_of(a), 'cancelled').inc()
        self.scheduler.cancel(a, self.now())
        self.sinks.pop(a, None)
        self._seen.pop(a, None)
        self._done.append(a)
      try:
        item = self.inbox.get_nowait()
      except queue.Empty:
        return

  def _forget(self) -> None:
    for rid in self._done:
      self.scheduler.records.pop(rid, None)
    self._done.clear()

  def _cls_of(self, request_id: int) -> str:
    rec = self.scheduler.records.get(request_id)
    return (rec.cls if rec is not None and rec.cls else next(iter(self.classes)))

  def _on_bytes(self, rec: Record, new: list, done: bool) -> None:
    sink = self.sinks.get(rec.id)
    cls = rec.cls or next(iter(self.classes))
    seen, experts, fallbacks = self._seen.get(rec.id, (0, {}, 0))
    self.metrics.tokens(rec.layers[seen:], [e for e, n in rec.experts.items()
                                            for _ in range(n - experts.get(e, 0))],
                        rec.fallbacks - fallbacks)
    self._seen[rec.id] = (len(rec.layers), dict(rec.experts), rec.fallbacks)
    if done:
      self._seen.pop(rec.id, None)
      if rec.error:
        self.metrics.requests.labels(cls, 'refused').inc()
      else:
        ttfb = None if rec.first_byte_s is None else rec.first_byte_s - rec.arrival_s
        self.metrics.finished(cls, rec.latency_s, ttfb, self.classes[cls].budget_s)
      self.sinks.pop(rec.id, None)
      self._done.append(rec.id)
    if sink is not None:
      sink.put((list(new), done, rec.error, rec if done else None))

  def _gauges(self) -> None:
    m, sched = self.metrics, self.scheduler
    m.queue.set(len(sched.queue))
    m.busy.set(sum(a is not None for a in sched.active))
    for c, i in sched.index.items():
      m.point.labels(c).set(i)
      m.point_layers.labels(c).set(float(getattr(self.points[i], 'mean_layers', 0.0)))
    m.compiles.set(engine_lib.lowerings() - self.lowerings_at_ready)
    sh = self.shadow
    if sh is not None:
      rows, events, secs = self._shadow_seen
      m.shadowed.inc(len(sh.rows) - rows)
      m.shadow_s.inc(sh.busy_s - secs)
      m.alarms.inc(sum(e['event'] == 'alarm' for e in sh.events[events:]))
      self._shadow_seen = (len(sh.rows), len(sh.events), sh.busy_s)
      w = sh.monitor.window
      m.window_tokens.set(0 if w is None else w.n)
      agreement = None if w is None else counts_lib.stats(w)['agreement']
      for i, lab in enumerate(sh.labels):
        m.certified.labels(lab).set(float(sh.monitor.certified[i]))
        if agreement is not None:
          m.agreement.labels(lab).set(agreement[i])


# ----------------------------------------------------------------------------- requests
class BadRequest(ValueError):
  """A request the server refuses: (HTTP status, one line)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def _field(body: dict, name: str, kinds: tuple, default: Any = None) -> Any:
  v = body.get(name, default)
  if v is not None and (not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds):
    names = ' or '.join(k.__name__ for k in kinds)
    raise BadRequest(f'{name}: must be {names}, got {json.dumps(v)[:40]}')
  return v


def parse_completion(body: Any, spec: Spec, loop: EngineLoop, request_id: int) -> Request:
  """The scheduler request of a completions body, or BadRequest naming the field."""
  if not isinstance(body, dict):
    raise BadRequest('the body must be a JSON object')
  known = {'prompt', 'max_tokens', 'temperature', 'seed', 'stream', 'stop', 'latency_class',
           'operating_point', 'model', 'n', 'user'}
  unknown = sorted(set(body) - known)
  if unknown:
    raise BadRequest(f'unknown field(s) {", ".join(unknown)}; allowed: {", ".join(sorted(known))}')
  prompt = _field(body, 'prompt', (str, list))
  if isinstance(prompt, list):  # OpenAI accepts a list of prompts; one per request here
    if len(prompt) != 1 or not isinstance(prompt[0], str):
      raise BadRequest('prompt: one string per request (a list must hold exactly one)')
    prompt = prompt[0]
  if not prompt:
    raise BadRequest('prompt: missing or empty (a request needs at least one prompt byte)')
  max_tokens = _field(body, 'max_tokens', (int,), 16)
  if max_tokens < 1:
    raise BadRequest(f'max_tokens={max_tokens}: must be >= 1')
  if _field(body, 'n', (int,), 1) != 1:
    raise BadRequest('n: one completion per request')
  temperature = float(_field(body, 'temperature', (int, float), 0.0))
  if not 0.0 <= temperature <= 2.0:
    raise BadRequest(f'temperature={temperature}: must be in [0, 2]')
  if temperature > 0 and loop.engine.mode == 'exact':
    raise BadRequest('temperature: this server runs exact (full-depth greedy) decoding; use 0')
  seed = _field(body, 'seed', (int,), 0)
  if not 0 <= seed < 2 ** 32:
    raise BadRequest(f'seed={seed}: must be in [0, 2^32)')
  _field(body, 'stream', (bool,), False)
  stop = _field(body, 'stop', (str, list), None)
  stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
    raise BadRequest(f'stop: up to {MAX_STOP} non-empty strings')
  cls = _field(body, 'latency_class', (str,), '') or ''
  if cls and cls not in loop.classes:
    raise BadRequest(f'latency_class={cls!r}: unknown; known: {", ".join(loop.classes)}')
  point = None
  op = _field(body, 'operating_point', (dict,), None)
  if op is not None:
    extra = sorted(set(op) - {'threshold', 'max_layers'})
    if extra or 'threshold' not in op:
      raise BadRequest('operating_point: {"threshold": t in (0, 1], "max_layers": n or null}')
    t = op['threshold']
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
      raise BadRequest(f'operating_point.threshold={json.dumps(t)[:20]}: must be in (0, 1]')
    try:
      point = OperatingPoint(float(t), op.get('max_layers'))
      point.validate(spec, 'operating_point.threshold', 'operating_point.max_layers')
    except (ConfigError, TypeError, ValueError) as e:
      raise BadRequest(str(e)) from None
  ids = list(prompt.encode('utf-8'))
  r = Request(request_id, 0.0, ids, max_tokens, cls=cls, point=point,
              stop=tuple(s.encode('utf-8') for s in stops), eos=True,
              temperature=temperature, seed=seed)
  err = check_request(r, loop.engine.max_len)
  if err:
    raise BadRequest(err)
  return r


def _error(status: int, message: str) -> JSONResponse:
  kind = 'invalid_request_error' if status < 500 else 'server_error'
  return JSONResponse({'error': {'message': message, 'type': kind}}, status_code=status)


class App:
  """The ASGI application over one EngineLoop (`app.asgi` is what uvicorn serves)."""

  def __init__(self, loop: EngineLoop, spec: Spec, model_name: str):
    self.loop, self.spec, self.model_name = loop, spec, model_name
    self.draining = False
    self.asgi = Starlette(routes=[
        Route('/v1/completions', self.completions, methods=['POST']),
        Route('/metrics', self.metrics, methods=['GET']),
        Route('/healthz', self.healthz, methods=['GET'])])

  async def healthz(self, request: HttpRequest) -> Response:
    del request
    if self.loop.error:
      return JSONResponse({'status': 'failed', 'error': self.loop.error}, status_code=503)
    if self.draining:
      return JSONResponse({'status': 'draining'}, status_code=503)
    if not self.loop.ready.is_set():
      return JSONResponse({'status': 'warming up'}, status_code=503)
    return JSONResponse({'status': 'ready', 'in_flight': self.loop.in_flight})

  async def metrics(self, request: HttpRequest) -> Response:
    del request
    return Response(self.loop.metrics.exposition(), media_type=CONTENT_TYPE)

  async def completions(self, request: HttpRequest) -> Response:
    if self.draining:
      self.loop.metrics.requests.labels(next(iter(self.loop.classes)), 'draining').inc()
      return _error(503, 'the server is draining (shutting down): retry on another replica')
    if not self.loop.ready.is_set() or self.loop.error:
      return _error(503, self.loop.error or 'the server is warming up: retry when /healthz '
                    'says ready')
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      self.loop.metrics.requests.labels(next(iter(self.loop.classes)), 'refused').inc()
      return _error(400, f'malformed JSON: {e}')
    rid = next(self.loop.ids)
    try:
      req = parse_completion(body, self.spec, self.loop, rid)
    except BadRequest as e:
      cls = body.get('latency_class') if isinstance(body, dict) else None
      cls = cls if cls in self.loop.classes else next(iter(self.loop.classes))
      self.loop.metrics.requests.labels(cls, 'refused').inc()
      return _error(e.status, str(e))
    sink = _Sink(asyncio.get_running_loop())
    self.loop.submit(req, sink)
    name = f'cmpl-{rid}'
    if body.get('stream'):
      return StreamingResponse(self._stream(req, sink, name), media_type='text/event-stream')
    ids: list[int] = []
    try:
      while True:
        new, done, err, rec = await sink.queue.get()
        ids += new
        if done:
          break
    except asyncio.CancelledError:
      self.loop.cancel(rid)
      raise
    if err:
      return _error(400 if 'engine error' not in err else 500, err)
    return JSONResponse({
        'id': name, 'object': 'text_completion', 'created': int(time.time()),
        'model': self.model_name,
        'choices': [{'text': decode_bytes(ids), 'index': 0, 'logprobs': None,
                     'finish_reason': rec.finish_reason}],
        'usage': {'prompt_tokens': len(req.prompt), 'completion_tokens': len(ids),
                  'total_tokens': len(req.prompt) + len(ids)},
        'act_jax': self._telemetry(rec, ids)})

  def _telemetry(self, rec: Record, ids: list) -> dict:
    row = rec.as_json(self.spec.model.num_layers)
    return {'token_ids': ids, 'mean_layers': row['mean_layers'],
            'exit_histogram': row['exit_histogram'],
            'latency_class': rec.cls or next(iter(self.loop.classes)),
            'operating_points': row['points'], 'latency_s': row['latency_s'],
            'ttfb_s': row['ttfb_s']}

  async def _stream(self, req: Request, sink: _Sink, name: str):
    utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')
    created = int(time.time())
    ids: list[int] = []

    def event(text: str, finish: Optional[str], extra: Optional[dict] = None) -> str:
      chunk = {'id': name, 'object': 'text_completion', 'created': created,
               'model': self.model_name,
               'choices': [{'text': text, 'index': 0, 'logprobs': None,
                            'finish_reason': finish}]}
      if extra:
        chunk.update(extra)
      return f'data: {json.dumps(chunk)}\n\n'

    done = False
    try:
      while not done:
        new, done, err, rec = await sink.queue.get()
        if err:
          yield f'data: {json.dumps({"error": {"message": err, "type": "server_error"}})}\n\n'
          return
        ids += new
        text = utf8.decode(bytes(t for t in new if t < 256), final=False)
        if done:
          text += utf8.decode(b'', final=True)
          yield event(text, rec.finish_reason, {'act_jax': self._telemetry(rec, ids)})
        elif text:
          yield event(text, None)
      yield 'data: [DONE]\n\n'
    finally:
      if not done:  # the client went away mid-stream: free its slot
        self.loop.cancel(req.id)


def build(engine: engine_lib.Engine, spec: Spec, points: Sequence[Any],
          ops: Sequence[OperatingPoint], classes: Sequence[LatencyClass], model_name: str,
          log: Callable[[str], None] = print, shadow: Any = None) -> App:
  """The engine thread (not started) and the app over it. shadow: the drift monitor
  (monitor.Shadow, already warmed up) or None."""
  metrics = ServerMetrics(spec.model.num_layers, engine.slots, [c.name for c in classes])
  return App(EngineLoop(engine, points, ops, classes, metrics, log, shadow), spec, model_name)


def serve(app: App, host: str, port: int, log: Callable[[str], None] = print) -> None:
  """Runs the server until SIGTERM/SIGINT, then drains: /healthz and new requests say 503,
  requests in flight finish, and it returns (the process exits 0)."""
  class _Draining(uvicorn.Server):
    def handle_exit(self, sig: int, frame: Any) -> None:
      if app.draining:          # a second signal: stop now
        super().handle_exit(sig, frame)
        return
      app.draining = True
      app.loop.metrics.ready.set(0)
      log(f'signal {sig}: draining {app.loop.in_flight} request(s) in flight, refusing new '
          f'ones')

      def wait() -> None:
        while app.loop.in_flight and not app.loop.error:
          time.sleep(0.05)
        self.should_exit = True
      threading.Thread(target=wait, daemon=True).start()

  app.loop.start()
  config = uvicorn.Config(app.asgi, host=host, port=port, log_level='warning',
                          timeout_graceful_shutdown=5)
  log(f'listening on http://{host}:{port} (POST /v1/completions, GET /metrics, GET /healthz); '
      f'warming up ...')
  _Draining(config).run()
  app.loop.stopped.set()
  log('drained; exiting')


__all__ = ['App', 'BadRequest', 'EngineLoop', 'LatencyClass', 'build', 'parse_completion',
           'serve']
