"""Request traces for the early-exit serving loop: a JSONL file, or a seeded generator.

A trace is a list of `TraceRequest`s sorted by arrival time. `load(text)` takes

* `poisson:rate=R,duration=D[,...]`: a homogeneous Poisson process of rate R requests/s on
  [0, D) seconds.
* `bursty:base=B,peak=P,duration=D[,period=T,burst=W,offset=O,...]`: an on/off
  (non-homogeneous) Poisson process whose rate is

      λ(t) = P  if (t - O) mod T < W   (t in [kT + O, kT + O + W) for some integer k)
      λ(t) = B  otherwise,

  defaults T = 20 s, W = 6 s, O = T/4: the trace starts calm, and 60 s hold 3 bursts.
* a path to a `.jsonl` file, one request per line (see `parse_jsonl`).

Common generator options: `seed=0`, `prompt=16-64` and `new=16-48` (prompt bytes and bytes to
generate: an inclusive uniform integer range `lo-hi`, or one integer), `code=0.5` (fraction of
requests in domain 'code', the rest 'prose'), `interactive=0` (fraction of requests in latency
class 'interactive', the rest in 'batch'; 0: no classes). Durations take an optional
trailing `s`.

Sampling. λ(t) is piecewise constant, so the process is sampled exactly segment by segment:
on a segment [a, b) of rate r the count is Poisson(r (b - a)) and, given the count, the
arrival times are i.i.d. uniform on [a, b) (the order statistics of a Poisson process). No
thinning is needed and no arrival is lost at a segment boundary. The same seed gives the same
trace (numpy.random.default_rng). Generated requests carry no prompt bytes: the server fills
them from held-out data of their domain.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np

from act_jax.errors import ConfigError

DOMAINS = ('code', 'prose')
KINDS = ('poisson', 'bursty')
_FORMS = "'poisson:rate=R,duration=D', 'bursty:base=B,peak=P,duration=D' or a path to a .jsonl file"
_JSONL_FIELDS = ('arrival_s', 'max_new', 'prompt', 'prompt_len', 'domain', 'class')
# A replay waits for every arrival and a request holds its slot for max_new bytes: bounds a
# real trace stays far inside, which keep a typo from sleeping for years or never finishing.
MAX_ARRIVAL_S = 7 * 24 * 3600.0
MAX_NEW = 1_000_000
# Options of each kind: name -> default (None: required). Order is the order of the docs.
_COMMON = {'seed': 0, 'prompt': '16-64', 'new': '16-48', 'code': 0.5, 'interactive': 0.0}
_OPTIONS = {
    'poisson': {'rate': None, 'duration': None, **_COMMON},
    'bursty': {'base': None, 'peak': None, 'duration': None, 'period': 20.0, 'burst': 6.0,
               'offset': 'period/4', **_COMMON},
}
# A generator that would make more requests than this is a typo (rate=1e9), not a trace.
_MAX_EXPECTED = 10_000_000


@dataclasses.dataclass(frozen=True)
class TraceRequest:
  """One request: when it arrives, how long its prompt is, how many bytes to generate."""
  id: int  # 0.. in arrival order
  arrival_s: float  # seconds from the trace start, >= 0
  prompt_len: int  # bytes, >= 1
  max_new: int  # bytes to generate, >= 1
  domain: str  # one of DOMAINS
  prompt: bytes | None = None  # from a JSONL line; else the server fills it from held-out data
  phase: str = ''  # 'burst' | 'base' (bursty), 'poisson' (poisson), '' (files)
  cls: str = ''  # latency class ('': the server's first)


def in_burst(t: float, period: float, burst: float, offset: float | None = None) -> bool:
  """Whether time t (s) lies in a burst [k period + offset, k period + offset + burst)."""
  if offset is None:
    offset = period / 4
  return (t - offset) % period < burst


# ---------------------------------------------------------------------------- JSONL files


def _is_number(v: Any) -> bool:
  # bool is an int subclass in Python; true/false is never a time or a length.
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _json(v: Any) -> str:
  """A JSONL value as it is written in the file (true, not True), cut to a readable length."""
  s = json.dumps(v)
  return s if len(s) <= 40 else s[:37] + '...'


def _show(v: Any) -> str:
  """An option value as the user typed it: rate=0, not rate='0'."""
  return v if isinstance(v, str) else repr(v)


def _parse_line(obj: Any, where: str) -> tuple[float, int, int, str, bytes | None, str]:
  """(arrival_s, prompt_len, max_new, domain, prompt, class) of one JSONL object; ConfigError
  if bad."""
  if not isinstance(obj, dict):
    raise ConfigError(f'{where}: expected a JSON object with fields {", ".join(_JSONL_FIELDS)}, '
                      f'got {type(obj).__name__}')
  for key in obj:
    if key not in _JSONL_FIELDS:
      raise ConfigError(f'{where}: {key}: unknown field; allowed: {", ".join(_JSONL_FIELDS)}')
  for key in ('arrival_s', 'max_new'):
    if key not in obj:
      raise ConfigError(f'{where}: {key}: missing; every line needs arrival_s and max_new')
  t = obj['arrival_s']
  if not _is_number(t) or not math.isfinite(t) or not 0 <= t <= MAX_ARRIVAL_S:
    raise ConfigError(f'{where}: arrival_s={_json(t)}: must be a number in [0, '
                      f'{MAX_ARRIVAL_S:g}] (seconds from the start of the trace)')
  max_new = obj['max_new']
  if not _is_int(max_new) or not 1 <= max_new <= MAX_NEW:
    raise ConfigError(f'{where}: max_new={_json(max_new)}: must be an integer in [1, '
                      f'{MAX_NEW}] (bytes)')
  domain = obj.get('domain', 'code')
  if domain not in DOMAINS:
    raise ConfigError(f'{where}: domain={_json(domain)}: allowed: {", ".join(DOMAINS)}')
  prompt = None
  if 'prompt' in obj:
    if not isinstance(obj['prompt'], str) or not obj['prompt']:
      raise ConfigError(f'{where}: prompt={_json(obj["prompt"])}: must be a non-empty string')
    try:
      prompt = obj['prompt'].encode('utf-8')
    except UnicodeEncodeError as e:  # a lone surrogate (JSON allows "\ud800")
      raise ConfigError(f'{where}: prompt: character {e.start} is a lone surrogate '
                        f'({e.object[e.start]!r}), not text UTF-8 can encode') from None
  if 'prompt_len' in obj:
    n = obj['prompt_len']
    if not _is_int(n) or n < 1:
      raise ConfigError(f'{where}: prompt_len={_json(n)}: must be an integer >= 1 (bytes)')
    if prompt is not None and n != len(prompt):
      raise ConfigError(f'{where}: prompt_len={n}: the prompt has {len(prompt)} UTF-8 bytes; '
                        f'give one of prompt, prompt_len, or both consistent')
  elif prompt is None:
    raise ConfigError(f'{where}: prompt: missing; give prompt (a string) or prompt_len (int >= 1)')
  cls = obj.get('class', '')
  if not isinstance(cls, str) or (cls and not cls.isidentifier()):
    raise ConfigError(f'{where}: class={_json(cls)}: must be a latency class name (an '
                      f'identifier, as in --classes)')
  return float(t), (len(prompt) if prompt is not None else n), max_new, domain, prompt, cls


def parse_jsonl(path: str) -> list[TraceRequest]:
  """Requests of a JSONL trace file, sorted by arrival (stable), ids renumbered 0...

  One JSON object per non-blank line: arrival_s (number in [0, MAX_ARRIVAL_S], required),
  max_new (int in [1, MAX_NEW], required), prompt (a string; its UTF-8 bytes) and/or
  prompt_len (int >= 1), domain (optional, 'code' or 'prose', default 'code'). Anything else
  is a ConfigError naming `path:line: field`.
  """
  if not os.path.isfile(path):
    raise ConfigError(f'{path}: no such trace file (a trace is {_FORMS})')
  rows = []
  try:
    with open(path, encoding='utf-8') as f:
      # File iteration splits on newlines only (a U+2028 inside a JSON string stays put).
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f'{path}:{lineno}'
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ConfigError(f'{where}: line: not valid JSON ({e.msg} at column {e.colno}); '
                            f'expected one JSON object per line') from None
        rows.append(_parse_line(obj, where))
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from None
  if not rows:
    raise ConfigError(f'{path} has no requests (one JSON object per line, e.g. '
                      f'{{"arrival_s": 0.0, "prompt": "def f(", "max_new": 32}})')
  rows.sort(key=lambda r: r[0])  # stable: equal arrivals keep their file order
  return [TraceRequest(i, t, n, m, d, p, '', c) for i, (t, n, m, d, p, c) in enumerate(rows)]


# ------------------------------------------------------------------------------- generators


def _number(kind: str, name: str, v: Any, what: str, *, seconds: bool = False,
            positive: bool = True) -> float:
  """A finite float from a number or a string ('60', '60s' when seconds)."""
  x = v
  if isinstance(v, str):
    s = v.strip()
    if seconds and s.endswith('s'):
      s = s[:-1]
    try:
      x = float(s)
    except ValueError:
      x = None
  ok = _is_number(x) and math.isfinite(x) and (x > 0 if positive else x >= 0)
  if not ok:
    raise ConfigError(f'trace option {kind}:{name}={_show(v)}: must be a '
                      f'{"positive" if positive else "non-negative"} number ({what})')
  return float(x)


def _range(kind: str, name: str, v: Any) -> tuple[int, int]:
  """(lo, hi) from 'lo-hi', 'n', an int or a pair; 1 <= lo <= hi."""
  lo = hi = None
  if _is_int(v):
    lo = hi = v
  elif isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(x) for x in v):
    lo, hi = v
  elif isinstance(v, str):
    m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', v)
    if m:
      lo = int(m.group(1))
      hi = int(m.group(2)) if m.group(2) is not None else lo
  if lo is None or lo < 1 or hi < lo:
    raise ConfigError(f'trace option {kind}:{name}={_show(v)}: must be an integer >= 1 or a range '
                      f'lo-hi with 1 <= lo <= hi (bytes)')
  return lo, hi


def _seed(kind: str, v: Any) -> int:
  if isinstance(v, str) and re.fullmatch(r'\s*\d+\s*', v):
    v = int(v)
  if not _is_int(v) or v < 0:
    raise ConfigError(f'trace option {kind}:seed={_show(v)}: must be an integer >= 0')
  return v


def _resolve(kind: str, params: dict[str, Any]) -> dict[str, Any]:
  """Typed, defaulted options of a generator; ConfigError naming the first bad option."""
  if kind not in _OPTIONS:
    raise ConfigError(f'trace kind {kind!r}: unknown; allowed: {_FORMS}')
  known = _OPTIONS[kind]
  for name in params:
    if name not in known:
      raise ConfigError(f'trace option {kind}:{name}: unknown; allowed: {", ".join(known)}')
  for name, default in known.items():
    if default is None and name not in params:
      required = [n for n, d in known.items() if d is None]
      raise ConfigError(f'trace option {kind}:{name}: missing; {kind} needs '
                        f'{", ".join(f"{n}=" for n in required)}')
  p = {**known, **params}
  out: dict[str, Any] = {}
  if kind == 'poisson':
    out['rate'] = _number(kind, 'rate', p['rate'], 'requests/s')
  else:
    out['base'] = _number(kind, 'base', p['base'], 'requests/s between bursts')
    out['peak'] = _number(kind, 'peak', p['peak'], 'requests/s during bursts')
    out['period'] = _number(kind, 'period', p['period'], 'seconds', seconds=True)
    out['burst'] = _number(kind, 'burst', p['burst'], 'seconds', seconds=True)
    if out['burst'] >= out['period']:
      raise ConfigError(f'trace option {kind}:burst={_show(p["burst"])}: must be < '
                        f'period={out["period"]:g} (seconds at the peak rate in each period)')
    if p['offset'] == 'period/4':
      out['offset'] = out['period'] / 4
    else:
      out['offset'] = _number(kind, 'offset', p['offset'], 'seconds', seconds=True,
                              positive=False)
  out['duration'] = _number(kind, 'duration', p['duration'], 'seconds', seconds=True)
  if kind == 'bursty' and out['duration'] / out['period'] > 1e6:
    # One pair of segments per period: keep the loop in _segments short.
    raise ConfigError(f'trace option {kind}:period={_show(p["period"])}: more than a million '
                      f'periods in duration={out["duration"]:g}s; use a longer period')
  out['seed'] = _seed(kind, p['seed'])
  out['prompt'] = _range(kind, 'prompt', p['prompt'])
  out['new'] = _range(kind, 'new', p['new'])
  code = _number(kind, 'code', p['code'], 'a fraction in [0, 1]', positive=False)
  if code > 1:
    raise ConfigError(f'trace option {kind}:code={_show(p["code"])}: must be a fraction in [0, 1]')
  out['code'] = code
  share = _number(kind, 'interactive', p['interactive'], 'a fraction in [0, 1]',
                  positive=False)
  if share > 1:
    raise ConfigError(f'trace option {kind}:interactive={_show(p["interactive"])}: must be a '
                      f'fraction in [0, 1]')
  out['interactive'] = share
  return out


def _segments(kind: str, o: dict[str, Any]) -> list[tuple[float, float, float]]:
  """(start, end, rate) pieces of λ(t) covering [0, duration)."""
  d = o['duration']
  if kind == 'poisson':
    return [(0.0, d, o['rate'])]
  period, burst, offset = o['period'], o['burst'], o['offset']
  edges = {0.0, d}
  k = math.floor(-offset / period) - 1  # the first period whose burst could reach t >= 0
  while k * period + offset < d:
    for e in (k * period + offset, k * period + offset + burst):
      if 0 < e < d:
        edges.add(e)
    k += 1
  edges = sorted(edges)
  return [(a, b, o['peak'] if in_burst((a + b) / 2, period, burst, offset) else o['base'])
          for a, b in zip(edges[:-1], edges[1:])]


def _num_bursts(o: dict[str, Any]) -> int:
  """Bursts that overlap [0, duration)."""
  period, burst, offset, d = o['period'], o['burst'], o['offset'], o['duration']
  k, count = math.floor(-offset / period) - 1, 0
  while k * period + offset < d:
    count += k * period + offset + burst > 0
    k += 1
  return count


def generate(kind: str, **params: Any) -> list[TraceRequest]:
  """A seeded trace of kind 'poisson' or 'bursty' (options: the module docstring).

  Options are numbers or the strings of a trace spec ('60s', '16-64')."""
  o = _resolve(kind, params)
  segments = _segments(kind, o)
  expected = sum(r * (b - a) for a, b, r in segments)
  if expected > _MAX_EXPECTED:
    raise ConfigError(f'trace {kind}: {expected:.3g} requests expected, more than '
                      f'{_MAX_EXPECTED:,}; lower the rate or the duration')
  rng = np.random.default_rng(o['seed'])
  # Exact: Poisson count per constant-rate piece, uniform times given the count.
  times = np.concatenate([np.sort(rng.uniform(a, b, rng.poisson(r * (b - a))))
                          for a, b, r in segments])
  n = len(times)
  if n == 0:
    raise ConfigError(f'trace {kind}: the trace is empty (0 requests, {expected:.3g} expected); '
                      f'raise the rate or the duration')
  prompt_len = rng.integers(o['prompt'][0], o['prompt'][1], n, endpoint=True)
  max_new = rng.integers(o['new'][0], o['new'][1], n, endpoint=True)
  is_code = rng.random(n) < o['code']
  if kind == 'poisson':
    phases = ['poisson'] * n
  else:
    phases = ['burst' if in_burst(t, o['period'], o['burst'], o['offset']) else 'base'
              for t in times]
  # drawn last, and only when asked: traces without classes keep their seeded requests
  cls = (['interactive' if u else 'batch' for u in rng.random(n) < o['interactive']]
         if o['interactive'] > 0 else [''] * n)
  return [TraceRequest(i, float(times[i]), int(prompt_len[i]), int(max_new[i]),
                       'code' if is_code[i] else 'prose', None, phases[i], cls[i])
          for i in range(n)]


# ------------------------------------------------------------------------------ dispatch


def _split(text: str) -> tuple[str, dict[str, str]] | None:
  """('poisson', {'rate': '50', ...}) for a generator spec, None for a path."""
  s = text.strip()
  kind, sep, rest = s.partition(':')
  if kind not in KINDS:
    # 'word:...' that is no file is a misspelt kind; anything else is a path.
    if os.path.exists(s) or not sep or not re.fullmatch(r'[A-Za-z_][\w-]*', kind):
      return None
    raise ConfigError(f'trace {text!r}: unknown kind {kind!r}; allowed: {_FORMS}')
  params: dict[str, str] = {}
  for item in rest.split(','):
    if not item.strip():
      continue
    name, eq, value = item.partition('=')
    name = name.strip()
    if not eq or not name:
      raise ConfigError(f'trace option {kind}:{item.strip()!r}: expected name=value; allowed '
                        f'names: {", ".join(_OPTIONS[kind])}')
    if name in params:
      raise ConfigError(f'trace option {kind}:{name}: given twice')
    params[name] = value.strip()
  return kind, params


def load(text: str) -> list[TraceRequest]:
  """The trace `text` names: 'poisson:...', 'bursty:...', or a path to a .jsonl file."""
  spec = _split(text)
  if spec is None:
    return parse_jsonl(os.path.expanduser(text.strip()))
  return generate(spec[0], **spec[1])


def options(text: str) -> tuple[str, dict[str, Any]]:
  """(kind, typed options with defaults) of a generator spec, e.g. to label burst times with
  in_burst(t, o['period'], o['burst'], o['offset']); ('jsonl', {'path': ...}) for a file."""
  spec = _split(text)
  if spec is None:
    return 'jsonl', {'path': os.path.expanduser(text.strip())}
  return spec[0], _resolve(*spec)


def describe(text: str) -> str:
  """One line for logs: what the trace is and what it holds."""
  kind, o = options(text)
  reqs = load(text)
  n = len(reqs)
  p = [r.prompt_len for r in reqs]
  m = [r.max_new for r in reqs]
  code = sum(r.domain == 'code' for r in reqs) / n
  mix = (f'prompt {min(p)}-{max(p)} B, new {min(m)}-{max(m)} B, {code:.0%} code')
  if kind == 'jsonl':
    span = reqs[-1].arrival_s
    rate = f', {n / span:.3g} req/s' if span > 0 else ''
    return f'{o["path"]}: {n} requests over {span:.3g}s{rate}; {mix}'
  seed = f'seed {o["seed"]}'
  if kind == 'poisson':
    return (f'poisson: {o["rate"]:g} req/s for {o["duration"]:g}s ({seed}): {n} requests; '
            f'{mix}')
  in_b = sum(r.phase == 'burst' for r in reqs)
  return (f'bursty: {o["base"]:g} req/s, {o["peak"]:g} req/s in {o["burst"]:g}s bursts every '
          f'{o["period"]:g}s from t={o["offset"]:g}s ({_num_bursts(o)} bursts in '
          f'{o["duration"]:g}s, {seed}): {n} requests, {in_b} in bursts; {mix}')
