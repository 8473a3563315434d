r"""Sends a request trace to a running server over HTTP (open loop) and reports client-side
latency and time to first byte next to what the server measured (act_jax/bench/loadgen.py).

  python -m experiments.serve --workdir=RUN --listen=127.0.0.1:8000 &
  python -m experiments.loadgen --url=http://127.0.0.1:8000 --workdir=RUN \
      --trace=bursty:base=2,peak=10,duration=40s,interactive=0.5 --out=runs/load1
--workdir gives the prompts (the run's held-out text, as experiments.serve draws them for a
trace replay); a JSONL trace with prompts needs none. Writes OUT/loadgen.json (summary and
one row per request) and prints the table.
"""
import dataclasses
import os

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.bench import loadgen
from act_jax.errors import ConfigError
from act_jax.run import directory as run_lib
from act_jax.serve import serving
from act_jax.serve import trace as trace_lib
from act_jax.serve.scheduler import Request

_URL = vocab.define('url', required=True)
_TRACE = vocab.define('trace', required=True)
_WORKDIR = vocab.define('workdir', help='The served run: prompts come from its held-out data.')
_CONCURRENCY = vocab.define('concurrency')
_OUT = vocab.define('out', help='Write OUT/loadgen.json.')
RESULT = 'loadgen.json'


def main(argv):
  del argv
  quiet_logs()
  if _OUT.value:
    run_lib.check_output_dir(_OUT.value, '--out', (RESULT,), 'a load run')
  trace = trace_lib.load(_TRACE.value)
  if _WORKDIR.value is None:
    if any(t.prompt is None for t in trace):
      raise ConfigError(f'--trace={_TRACE.value}: generated requests have no prompt text; '
                        f'give --workdir=RUN (its held-out data) or a JSONL trace with prompts')
    spec = None
  else:
    spec = run_lib.read_config(_WORKDIR.value)
    serving.check_generated_trace(_TRACE.value, spec.model.max_len)
  requests = (serving.heldout_prompts(spec, trace) if spec is not None else
              [Request(t.id, t.arrival_s, list(t.prompt), t.max_new, t.domain, t.phase,
                               t.cls) for t in trace])
  print(f'{trace_lib.describe(_TRACE.value)}: sending {len(requests)} requests to '
        f'{_URL.value} (at most {_CONCURRENCY.value} connections) ...')
  results = loadgen.send(_URL.value, requests, _CONCURRENCY.value)
  summary = loadgen.summarize(results)
  print(loadgen.format_summary(summary))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    run_lib.write_json(os.path.join(_OUT.value, RESULT),
                       {'url': _URL.value, 'trace': _TRACE.value, 'summary': summary,
                        'requests': [dataclasses.asdict(r) for r in results]})


if __name__ == '__main__':
  run(main)
