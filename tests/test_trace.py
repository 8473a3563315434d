"""Request traces: JSONL files (good and malformed), seeded Poisson and bursty generators."""
import json
import math

import numpy as np
import pytest

from act_jax.serve import trace
from act_jax.errors import ConfigError

GOOD_LINE = '{"arrival_s": 0.5, "prompt_len": 8, "max_new": 4}'


def _write(tmp_path, lines, name='t.jsonl'):
  path = tmp_path / name
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path)


def _error(fn, *args):
  with pytest.raises(ConfigError) as e:
    fn(*args)
  msg = str(e.value)
  assert '\n' not in msg  # one line
  return msg


def test_parse_jsonl_known_answer(tmp_path):
  path = _write(tmp_path, [
      '{"arrival_s": 2.0, "prompt": "caf\u00e9 ", "max_new": 8, "domain": "prose"}',
      '',
      '{"arrival_s": 0.25, "prompt_len": 12, "max_new": 3}',
      '   ',
      '{"arrival_s": 2.0, "prompt": "x", "prompt_len": 1, "max_new": 1, "domain": "code"}',
      '{"arrival_s": 0, "prompt": "def f(", "max_new": 32}',
  ])
  reqs = trace.parse_jsonl(path)
  assert reqs == [
      trace.TraceRequest(0, 0.0, 6, 32, 'code', b'def f('),
      trace.TraceRequest(1, 0.25, 12, 3, 'code', None),
      # Equal arrivals keep their file order; 'café ' is 6 UTF-8 bytes.
      trace.TraceRequest(2, 2.0, 6, 8, 'prose', 'caf\u00e9 '.encode()),
      trace.TraceRequest(3, 2.0, 1, 1, 'code', b'x'),
  ]
  assert isinstance(reqs[0].arrival_s, float) and reqs[0].phase == ''
  assert trace.load(path) == reqs
  assert trace.describe(path) == (f'{path}: 4 requests over 2s, 2 req/s; prompt 1-12 B, '
                                  f'new 1-32 B, 75% code')


@pytest.mark.parametrize('line, field', [
    ('{"arrival_s": 1.0, "max_new": 4', 'line: not valid JSON'),
    ('[1.0, 4]', 'expected a JSON object'),
    ('{"arrival_s": -0.5, "prompt_len": 8, "max_new": 4}', 'arrival_s=-0.5'),
    ('{"arrival_s": "1", "prompt_len": 8, "max_new": 4}', 'arrival_s="1"'),
    ('{"arrival_s": true, "prompt_len": 8, "max_new": 4}', 'arrival_s=true'),
    ('{"arrival_s": 1.0, "prompt_len": 8, "max_new": 4, "domain": "poetry"}',
     'domain="poetry": allowed: code, prose'),
    ('{"arrival_s": 1.0, "prompt_len": 8}', 'max_new: missing'),
    ('{"arrival_s": 1.0, "prompt_len": 8, "max_new": 2.5}', 'max_new=2.5'),
    ('{"arrival_s": 1.0, "prompt_len": 8, "max_new": 0}', 'max_new=0'),
    ('{"arrival_s": 1.0, "prompt_len": true, "max_new": 4}', 'prompt_len=true'),
    ('{"arrival_s": 1.0, "prompt": "abc", "prompt_len": 4, "max_new": 4}', 'prompt_len=4'),
    ('{"arrival_s": 1.0, "max_new": 4}', 'prompt: missing'),
    ('{"arrival_s": 1.0, "prompt": "", "max_new": 4}', 'prompt="": must be a non-empty'),
    ('{"arrival_s": 1.0, "prompt_len": 8, "max_new": 4, "priority": 1}',
     'priority: unknown field; allowed: arrival_s, max_new, prompt, prompt_len, domain'),
])
def test_malformed_line_names_line_and_field(tmp_path, line, field):
  path = _write(tmp_path, [GOOD_LINE, '', line])  # the bad line is line 3
  msg = _error(trace.parse_jsonl, path)
  assert msg.startswith(f'{path}:3: {field}'), msg


def test_empty_and_missing_files(tmp_path):
  path = _write(tmp_path, ['', '  '])
  assert 'has no requests' in _error(trace.parse_jsonl, path)
  missing = str(tmp_path / 'nope.jsonl')
  msg = _error(trace.load, missing)
  assert missing in msg and 'no such trace file' in msg
  bad = tmp_path / 'latin1.jsonl'
  bad.write_bytes(b'{"arrival_s": 0, "prompt": "caf\xe9", "max_new": 1}\n')
  assert 'not UTF-8' in _error(trace.load, str(bad))


def test_poisson_count_order_and_marks():
  reqs = trace.load('poisson:rate=50,duration=20')
  assert abs(len(reqs) - 1000) < 5 * math.sqrt(1000)
  t = np.array([r.arrival_s for r in reqs])
  assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < 20
  assert [r.id for r in reqs] == list(range(len(reqs)))
  # Exponential gaps: P(gap > 2/rate) = e^-2 = 0.135.
  assert np.mean(np.diff(t) > 2 / 50) == pytest.approx(math.exp(-2), abs=0.03)
  assert {r.phase for r in reqs} == {'poisson'} and all(r.prompt is None for r in reqs)
  assert min(r.prompt_len for r in reqs) == 16 and max(r.prompt_len for r in reqs) == 64
  assert min(r.max_new for r in reqs) == 16 and max(r.max_new for r in reqs) == 48
  assert np.mean([r.domain == 'code' for r in reqs]) == pytest.approx(0.5, abs=0.06)


def test_generators_are_seeded():
  a = trace.load('poisson:rate=50,duration=20')
  assert trace.load('poisson:rate=50,duration=20s,seed=0') == a
  assert trace.generate('poisson', rate=50, duration=20) == a
  b = trace.load('poisson:rate=50,duration=20,seed=1')
  assert [r.arrival_s for r in b[:10]] != [r.arrival_s for r in a[:10]]
  c = trace.load('poisson:rate=5,duration=10,prompt=32,new=7-9,code=0')
  assert {r.prompt_len for r in c} == {32} and {r.max_new for r in c} <= {7, 8, 9}
  assert {r.domain for r in c} == {'prose'}


def test_in_burst():
  # Defaults: period 20, burst 6, offset 5: bursts [5, 11), [25, 31), ...
  assert [trace.in_burst(t, 20, 6) for t in (0, 4.99, 5, 10.99, 11, 24.9, 25, 45)] == [
      False, False, True, True, False, False, True, True]
  assert trace.in_burst(0.0, 20, 6, 0.0) and not trace.in_burst(6.0, 20, 6, 0.0)
  assert trace.in_burst(1.0, 10, 8, 5.0)  # the burst of period -1 runs to t = 3


def test_bursty_rates_and_phases():
  text = 'bursty:base=5,peak=40,duration=200s'
  kind, o = trace.options(text)
  assert kind == 'bursty' and (o['period'], o['burst'], o['offset']) == (20.0, 6.0, 5.0)
  reqs = trace.load(text)
  t = np.array([r.arrival_s for r in reqs])
  inside = np.array([trace.in_burst(x, 20, 6, 5) for x in t])
  assert [r.phase for r in reqs] == ['burst' if b else 'base' for b in inside]
  # 10 bursts of 6 s = 60 s at 40/s; 140 s at 5/s.
  assert inside.sum() / 60 == pytest.approx(40, rel=0.15)
  assert (~inside).sum() / 140 == pytest.approx(5, rel=0.15)
  assert t.min() >= 0 and t.max() < 200 and np.all(np.diff(t) >= 0)
  assert not inside[t < 5].any()  # starts calm
  assert '10 bursts in 200s' in trace.describe(text)
  assert '3 bursts in 60s' in trace.describe('bursty:base=5,peak=40,duration=60')
  # Custom period/burst/offset.
  reqs = trace.load('bursty:base=1,peak=100,duration=10,period=5,burst=1s,offset=0')
  t = np.array([r.arrival_s for r in reqs if r.phase == 'burst'])
  assert np.all((t % 5) < 1) and len(t) == pytest.approx(200, rel=0.2)


@pytest.mark.parametrize('text, want', [
    ('poisson:rate=0,duration=10', 'poisson:rate=0: must be a positive number'),
    ('poisson:rate=-2,duration=10', 'poisson:rate=-2'),
    ('poisson:rate=abc,duration=10', 'poisson:rate=abc'),
    ('poisson:rate=5,duration=0s', 'poisson:duration=0s'),
    ('poisson:rate=5,duration=ten', 'poisson:duration=ten'),
    ('poisson:rate=5,duration=10,prompt=64-16', 'poisson:prompt=64-16: must be an integer >= 1'),
    ('poisson:rate=5,duration=10,new=0-5', 'poisson:new=0-5'),
    ('poisson:rate=5,duration=10,code=1.5', 'poisson:code=1.5: must be a fraction in [0, 1]'),
    ('poisson:rate=5,duration=10,seed=x', 'poisson:seed=x'),
    ('poisson:rate=5,duration=10,burst=3', 'poisson:burst: unknown; allowed: rate, duration'),
    ('poisson:rate=5,duration=10,rate=6', 'poisson:rate: given twice'),
    ('poisson:rate=5,duration=10,oops', "poisson:'oops': expected name=value"),
    ('poisson:duration=10', 'poisson:rate: missing'),
    ('bursty:base=1,duration=10', 'bursty:peak: missing'),
    ('bursty:base=0,peak=5,duration=10', 'bursty:base=0'),
    ('bursty:base=1,peak=5,duration=10,burst=20', 'bursty:burst=20: must be < period=20'),
    ('bursty:base=1,peak=5,duration=10,period=8s,burst=8s', 'bursty:burst=8s'),
    ('bursty:base=1,peak=5,duration=10,offset=-1', 'bursty:offset=-1'),
])
def test_bad_options_name_the_option(text, want):
  msg = _error(trace.load, text)
  assert want in msg, msg


def test_unknown_kind_and_empty_trace():
  msg = _error(trace.load, 'foo:rate=1')
  assert "unknown kind 'foo'" in msg
  assert all(s in msg for s in ('poisson', 'bursty', 'a path to a .jsonl file'))
  msg = _error(trace.load, 'poisson:rate=0.001,duration=1')
  assert 'empty' in msg and 'raise the rate or the duration' in msg
  with pytest.raises(ConfigError, match='unknown; allowed'):
    trace.generate('poisson', rate=1, duration=1, bogus=1)
  with pytest.raises(ConfigError, match="trace kind 'foo'"):
    trace.generate('foo', rate=1)


def test_generated_trace_roundtrips_through_jsonl(tmp_path):
  # A generated trace written as JSONL (what a user would save) reads back the same.
  reqs = trace.load('bursty:base=2,peak=20,duration=30,seed=3')
  path = _write(tmp_path, [json.dumps({'arrival_s': r.arrival_s, 'prompt_len': r.prompt_len,
                                       'max_new': r.max_new, 'domain': r.domain})
                           for r in reversed(reqs)])
  back = trace.load(path)
  assert [(r.id, r.arrival_s, r.prompt_len, r.max_new, r.domain) for r in back] == [
      (r.id, r.arrival_s, r.prompt_len, r.max_new, r.domain) for r in reqs]


def test_latency_classes_in_traces(tmp_path):
  """interactive=F puts about F of the requests in class 'interactive', the rest in 'batch',
  drawn after everything else: the same seed keeps the same arrivals, prompts and lengths.
  A JSONL line may name its class; a bad one is refused naming line and field."""
  plain = trace.load('poisson:rate=50,duration=20s,seed=3')
  mixed = trace.load('poisson:rate=50,duration=20s,seed=3,interactive=0.3')
  assert [(r.arrival_s, r.prompt_len, r.max_new, r.domain) for r in plain] == \
      [(r.arrival_s, r.prompt_len, r.max_new, r.domain) for r in mixed]
  assert {r.cls for r in plain} == {''} and {r.cls for r in mixed} == {'interactive', 'batch'}
  share = sum(r.cls == 'interactive' for r in mixed) / len(mixed)
  assert 0.25 < share < 0.35, share
  path = _write(tmp_path, ['{"arrival_s": 0, "prompt": "ab", "max_new": 2, "class": "batch"}',
                           '{"arrival_s": 1, "prompt": "cd", "max_new": 2}'])
  assert [r.cls for r in trace.load(str(path))] == ['batch', '']
  bad = _write(tmp_path, ['{"arrival_s": 0, "prompt": "ab", "max_new": 2, "class": "a b"}'],
               'bad.jsonl')
  with pytest.raises(ConfigError, match=r'bad.jsonl:1: class="a b": must be a latency class'):
    trace.load(str(bad))
  with pytest.raises(ConfigError, match='interactive=2: must be a fraction in'):
    trace.load('poisson:rate=1,duration=5s,interactive=2')
