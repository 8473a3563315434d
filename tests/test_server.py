"""The HTTP server (act_jax/serve/server.py) with real clients: the openai package and httpx.

One server per module, in this process (uvicorn on a thread, a free port), over the suite's
trained run 'lm' with two latency classes: 'interactive' at an exiting point and 'batch' at
full depth. Checks: greedy bytes equal `inference.generate` of the request alone (streamed
and not, several clients at once, both classes), /metrics parses and counts what was sent,
bad requests are refused alone in the middle of load, a client that leaves mid-stream frees
its slot, nothing compiles after warm-up. The SIGTERM drain runs the binary in a subprocess.
"""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from act_jax.bench import loadgen
from act_jax.calibrate import certify
from act_jax.data import EOS
from act_jax.infer import inference
from act_jax.run import directory as run_lib
from act_jax.serve import engine as engine_lib
from act_jax.serve import monitor
from act_jax.serve import scheduler
from act_jax.serve import server as server_lib
from act_jax.serve import slo
from act_jax.spec import NEVER_EXIT, OperatingPoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the run's context is 32 bytes: prompts of at most 9 bytes leave room for 20 more
PROMPTS = ['def add(', 'import os', 'The mod', 'class S:', 'for i in', '"""Ret', 'x = [',
           'if __n']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def served(shared_runs):
  """(base url, spec, variables, points) of a running in-process server."""
  spec, variables, _ = run_lib.load(shared_runs.path('lm'))
  points = [slo.Point(NEVER_EXIT, None, True, float(spec.model.num_layers), 1.0, 'full depth'),
            slo.Point(0.6, None, True, spec.model.num_layers / 2, None, '0.6')]
  ops = [OperatingPoint(p.threshold, p.max_layers) for p in points]
  classes = [server_lib.LatencyClass('interactive', slo.FixedController(points, 1), 0.5),
             server_lib.LatencyClass('batch', slo.FixedController(points, 0), 5.0)]
  engine = engine_lib.Engine(spec, variables, slots=3, steps_per_call=2, prefill_chunk=16)
  # the drift monitor scores every finished request; at tolerance 0.9 it never moves a
  # point, so every byte-equality test below also shows that shadowing changes no byte
  shadow = monitor.Shadow(monitor.ShadowScorer(spec, variables, ops),
                          monitor.Monitor([True, True], 'consistency', 0.9, 0.2, 64),
                          monitor.ShadowOptions(1.0, 64), [p.label for p in points])
  shadow.scorer.warmup()
  app = server_lib.build(engine, spec, points, ops, classes, 'lm', log=lambda s: None,
                         shadow=shadow)
  app.loop.start()
  port = _free_port()
  srv = uvicorn.Server(uvicorn.Config(app.asgi, host='127.0.0.1', port=port,
                                      log_level='warning'))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  url = f'http://127.0.0.1:{port}'
  loadgen.wait_ready(url)
  yield url, spec, variables, ops, app
  srv.should_exit = True
  thread.join(10)
  app.loop.stopped.set()


_REFS = {}


def _reference(spec, variables, prompt: str, max_new: int, point: OperatingPoint) -> list:
  """inference.generate of the request alone, cut at the first end-of-sequence token."""
  key = (prompt, max_new, point)
  if key not in _REFS:
    ids = np.frombuffer(prompt.encode(), np.uint8).astype(np.int32)[None]
    out = [int(x) for x in inference.generate(spec, variables, ids, max_new, point)['tokens'][0]]
    _REFS[key] = out[:out.index(EOS)] if EOS in out else out
  return _REFS[key]


def _metrics(url: str) -> dict:
  text = httpx.get(f'{url}/metrics').text
  out = {}
  for fam in text_string_to_metric_families(text):
    for s in fam.samples:
      out[(s.name, tuple(sorted(s.labels.items())))] = s.value
  return out


def test_completions_equal_decoding_alone_streamed_or_not(served):
  """Several clients at once (the openai client and raw SSE over httpx), both latency
  classes: every completion's bytes equal greedy decoding of its request alone at its
  class's point; the text is their UTF-8 decoding."""
  url, spec, v, ops, _ = served
  client = openai.OpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0)
  jobs = [(p, 6 + 2 * i, ('interactive', 'batch')[i % 2], i % 3 == 0)
          for i, p in enumerate(PROMPTS)]

  def one(job):
    prompt, n, cls, stream = job
    if not stream:
      c = client.completions.create(model='lm', prompt=prompt, max_tokens=n, temperature=0,
                                    extra_body={'latency_class': cls})
      return c.model_extra['act_jax']['token_ids'], c.choices[0].text, c
    ids, text, last = [], '', None
    with httpx.stream('POST', f'{url}/v1/completions', timeout=120,
                      json={'prompt': prompt, 'max_tokens': n, 'stream': True,
                            'latency_class': cls}) as r:
      assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
      lines = [x for x in r.iter_lines() if x.startswith('data: ')]
    assert lines[-1] == 'data: [DONE]'
    for x in lines[:-1]:
      chunk = json.loads(x[6:])
      text += chunk['choices'][0]['text']
      last = chunk
    ids = last['act_jax']['token_ids']
    assert last['choices'][0]['finish_reason'] in ('length', 'stop')
    return ids, text, None

  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    results = list(pool.map(one, jobs))
  for (prompt, n, cls, stream), (ids, text, c) in zip(jobs, results):
    point = ops[1] if cls == 'interactive' else ops[0]
    want = _reference(spec, v, prompt, n, point)
    assert ids == want, (prompt, cls, stream)
    assert text == bytes(t for t in ids if t < 256).decode('utf-8', 'replace')
    if c is not None:
      assert c.usage.completion_tokens == len(ids) and c.object == 'text_completion'
      assert c.choices[0].finish_reason == ('length' if len(ids) == n else 'stop')
  # the openai client's own streaming reads the same events
  chunks = list(client.completions.create(model='lm', prompt=PROMPTS[0], max_tokens=6,
                                          stream=True, extra_body={'latency_class': 'batch'}))
  assert ''.join(c.choices[0].text for c in chunks) == bytes(
      t for t in _reference(spec, v, PROMPTS[0], 6, ops[0]) if t < 256).decode('utf-8',
                                                                               'replace')


def test_bad_requests_are_refused_alone_under_load(served):
  """4xx with a one-line JSON error for each bad request, sent while good ones run; a
  stream whose client leaves mid-way frees its slot; the good ones are all served and
  /metrics counts every outcome."""
  url, spec, v, ops, app = served
  before = _metrics(url)
  bad = [(b'{"prompt": "x", ', 'malformed JSON'),
         (json.dumps({'max_tokens': 4}).encode(), 'prompt: missing or empty'),
         (json.dumps({'prompt': '', 'max_tokens': 4}).encode(), 'prompt: missing or empty'),
         (json.dumps({'prompt': 'x' * (spec.model.max_len + 5), 'max_tokens': 4}).encode(),
          'exceed the model context'),
         (json.dumps({'prompt': 'x', 'latency_class': 'bulk'}).encode(),
          "latency_class='bulk': unknown; known: interactive, batch"),
         (json.dumps({'prompt': 'x', 'max_tokens': 0}).encode(), 'max_tokens=0: must be >= 1'),
         (json.dumps({'prompt': 'x', 'max_tokens': 'many'}).encode(), 'max_tokens: must be int'),
         (json.dumps({'prompt': 'x', 'operating_point': {'threshold': 2}}).encode(),
          'operating_point.threshold=2: must be in (0, 1]'),
         (json.dumps({'prompt': 'x', 'best_of': 3}).encode(), 'unknown field(s) best_of')]
  good = [(p, 10) for p in PROMPTS[:5]]
  with httpx.Client(base_url=url, timeout=120) as http:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      oks = [pool.submit(http.post, '/v1/completions',
                         json={'prompt': p, 'max_tokens': n, 'latency_class': 'batch'})
             for p, n in good]
      # a client that reads one event of a long stream and goes away
      with http.stream('POST', '/v1/completions', json={
          'prompt': PROMPTS[5], 'max_tokens': spec.model.max_len - 12, 'stream': True}) as r:
        next(r.iter_lines())
      errs = [pool.submit(http.post, '/v1/completions', content=body,
                          headers={'content-type': 'application/json'}) for body, _ in bad]
      for f, (_, want) in zip(errs, bad):
        r = f.result()
        assert r.status_code == 400, r.text
        err = r.json()['error']
        assert want in err['message'] and '\n' not in err['message'], err
      for f, (p, n) in zip(oks, good):
        r = f.result()
        assert r.status_code == 200
        assert r.json()['act_jax']['token_ids'] == _reference(spec, v, p, n, ops[0])
  deadline = time.time() + 30  # the abandoned stream's slot comes back
  while time.time() < deadline and app.loop.in_flight:
    time.sleep(0.05)
  assert app.loop.in_flight == 0 and not any(app.loop.scheduler.active)
  after = _metrics(url)
  delta = lambda name, **labels: (after.get((name, tuple(sorted(labels.items()))), 0)  # noqa
                                  - before.get((name, tuple(sorted(labels.items()))), 0))
  assert delta('act_jax_requests_total', cls='batch', outcome='ok') == len(good)
  refused = sum(delta('act_jax_requests_total', cls=c, outcome='refused')
                for c in ('interactive', 'batch'))
  assert refused == len(bad)  # malformed JSON counts under the first class
  cancelled = delta('act_jax_requests_total', cls='interactive', outcome='cancelled')
  finished = delta('act_jax_requests_total', cls='interactive', outcome='ok')
  assert cancelled + finished == 1  # the abandoned stream: cancelled unless it had finished
  assert delta('act_jax_request_latency_seconds_count', cls='batch') == len(good)
  assert after[('act_jax_compiles_after_warmup', ())] == 0


def test_metrics_exposition_and_health(served):
  url, spec, v, ops, app = served
  r = httpx.get(f'{url}/healthz')
  assert r.status_code == 200 and r.json()['status'] == 'ready'
  httpx.post(f'{url}/v1/completions', json={'prompt': 'abc', 'max_tokens': 5,
                                            'latency_class': 'interactive'}, timeout=60)
  m = _metrics(url)
  names = {k[0] for k in m}
  for name in ('act_jax_requests_total', 'act_jax_request_latency_seconds_bucket',
               'act_jax_time_to_first_byte_seconds_bucket', 'act_jax_queue_length',
               'act_jax_busy_slots', 'act_jax_generated_bytes_total',
               'act_jax_layers_per_token_bucket', 'act_jax_expert_tokens_total',
               'act_jax_operating_point', 'act_jax_slo_violations_total', 'act_jax_ready',
               'act_jax_moe_fallbacks_total',
               'act_jax_compiles_after_warmup'):
    assert name in names, name
  assert m[('act_jax_operating_point', (('cls', 'interactive'),))] == 1
  assert m[('act_jax_ready', ())] == 1
  # every generated byte after the first is in the exit-depth histogram, at most L layers
  count = m[('act_jax_layers_per_token_count', ())]
  assert 0 < count <= m[('act_jax_generated_bytes_total', ())]
  assert m[('act_jax_layers_per_token_bucket', (('le', f'{spec.model.num_layers:.1f}'),))] == \
      count
  # the drift monitor: every finished request is shadowed once the server is idle
  for _ in range(100):
    m = _metrics(url)
    if m[('act_jax_shadow_requests_total', ())] >= 1 and not app.loop.shadow.pending:
      break
    time.sleep(0.05)
  sh = app.loop.shadow
  assert m[('act_jax_shadow_requests_total', ())] == len(sh.rows) >= 1
  assert m[('act_jax_drift_alarms_total', ())] == 0
  assert m[('act_jax_point_certified', (('point', '0.6'),))] == 1
  assert m[('act_jax_window_agreement', (('point', 'full depth'),))] == 1.0
  assert m[('act_jax_monitor_window_tokens', ())] == sh.monitor.window.n > 0
  assert m[('act_jax_compiles_after_warmup', ())] == 0


def test_loadgen_open_loop_against_the_server(served):
  """experiments.loadgen's core: requests sent at their arrival times over a few
  connections; every one served; the client's latency is the server's plus transport."""
  url, spec, v, ops, _ = served
  reqs = [scheduler.Request(i, 0.02 * i, list(p.encode()), 8, cls=('interactive', 'batch')[i % 2])
          for i, p in enumerate(PROMPTS * 2)]
  results = loadgen.send(url, reqs, concurrency=4)
  s = loadgen.summarize(results)
  assert s['sent'] == s['served'] == len(reqs) and s['refused'] == s['failed'] == 0
  for r in results:
    assert r.status == 200 and r.bytes >= 1
    assert r.latency_s >= r.server_latency_s - 1e-3 and r.ttfb_s <= r.latency_s + 1e-9
  assert set(s['classes']) == {'interactive', 'batch'}
  lat = s['latency_ms']
  assert lat['p50'] <= lat['p95'] <= lat['p99']
  assert '| interactive |' in loadgen.format_summary(s)


def test_sigterm_drains_then_exits_zero(shared_runs, tmp_path):
  """The binary: SIGTERM while requests are in flight -> they complete, a new request gets
  503, /healthz says draining, and the process exits 0, writing the drift monitor's
  shadow.jsonl into --out."""
  run = shared_runs.copy('lm', str(tmp_path / 'run'))
  certify.calibrate_run(run, tolerance=0.5, risk=0.2, num_batches=4, log=lambda s: None)
  out = tmp_path / 'out'
  port = _free_port()
  proc = subprocess.Popen(
      [sys.executable, '-m', 'experiments.serve', f'--workdir={run}',
       f'--listen=127.0.0.1:{port}', '--controller=fixed', '--slots=1', '--steps_per_call=1',
       '--shadow_fraction=1', '--monitor_window=64', f'--out={out}'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f'http://127.0.0.1:{port}'
  try:
    loadgen.wait_ready(url, alive=lambda: proc.poll() is None, why=proc.stdout.read)
    httpx.post(f'{url}/v1/completions', json={'prompt': 'def shadow(x):', 'max_tokens': 2},
               timeout=60)
    for _ in range(200):  # scored in the idle time after it
      if _metrics(url)[('act_jax_shadow_requests_total', ())] >= 1:
        break
      time.sleep(0.05)
    n = 48  # one slot, one byte per call: the queue takes seconds to drain
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
      futs = [pool.submit(httpx.post, f'{url}/v1/completions',
                          json={'prompt': PROMPTS[i % len(PROMPTS)], 'max_tokens': 20},
                          timeout=120) for i in range(n)]
      deadline = time.time() + 30
      while time.time() < deadline:  # a good part of them queued behind the slot
        m = _metrics(url)
        if m[('act_jax_queue_length', ())] >= 8:
          break
        time.sleep(0.005)
      proc.send_signal(signal.SIGTERM)
      time.sleep(0.05)
      late = httpx.post(f'{url}/v1/completions', json={'prompt': 'x', 'max_tokens': 2})
      health = httpx.get(f'{url}/healthz')
      done = [f.result() for f in futs]
    assert late.status_code == 503 and 'draining' in late.json()['error']['message']
    assert health.status_code == 503 and health.json()['status'] == 'draining'
    # those in before the signal are served in full, those after it are refused with 503
    codes = [r.status_code for r in done]
    assert set(codes) <= {200, 503} and codes.count(200) >= 8, codes
    assert all(len(r.json()['act_jax']['token_ids']) >= 1 for r in done if r.status_code == 200)
    assert proc.wait(60) == 0, proc.stdout.read()
    log = proc.stdout.read()
    assert 'draining' in log and 'drained; exiting' in log, log
    lines = [json.loads(x) for x in open(out / 'shadow.jsonl')]
    assert lines[0]['kind'] == 'header' and lines[0]['fraction'] == 1.0
    assert len(lines) >= 2 and all(x['kind'] == 'request' for x in lines[1:])
    assert lines[1]['n'] == len('def shadow(x):') - 1
  finally:
    if proc.poll() is None:
      proc.kill()
