r"""Replays a request trace through a continuous-batching early-exit server on a trained run.

  python -m experiments.calibrate --workdir=RUN --caps=0,4,2      # certified points first
  python -m experiments.serve --workdir=RUN \
      --trace=bursty:base=2,peak=12,duration=60s --slo_p95_ms=800 --controller=slo
  python -m experiments.serve --workdir=RUN --trace=my_traffic.jsonl --controller=fixed \
      --threshold=0.9 --max_layers=4
  python -m experiments.serve --workdir=RUN --trace=poisson:rate=4,duration=30s \
      --controller=fixed --mode=exact      # self-speculative: full-depth output
  python -m experiments.serve --workdir=RUN --listen=127.0.0.1:8000 \
      --classes=interactive=800,batch=8000  # an HTTP server (act_jax/serve/server.py)
  python -m experiments.serve --workdir=RUN --trace=traffic.jsonl --controller=fixed \
      --shadow_fraction=0.25 --out=OUT   # drift monitor (act_jax/serve/monitor.py)
  python -m experiments.calibrate --workdir=RUN --from_serving=OUT  # re-certify from it
  curl -s localhost:8000/v1/completions -d '{"prompt": "def f(", "max_tokens": 32}'
--listen serves until SIGTERM (in-flight requests finish, new ones get 503, exit 0);
experiments.loadgen sends a trace to it.
Traces: `poisson:rate=R,duration=D`, `bursty:base=B,peak=P,duration=D[,period=20s,burst=6s]`
(both: seed=, prompt=16-64, new=16-48, code=0.5), or a JSONL file with one request per line:
{"arrival_s": 0.5, "prompt": "def f(", "max_new": 32} (or "prompt_len" + "domain").
Writes requests.jsonl, steps.jsonl, summary.json and serve.png into --out (default
RUN/serve-<time>/) and prints the summary and the per-exit latency table; with
--shadow_fraction also shadow.jsonl (with --listen, --out holds only that, written on exit).
"""
from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.errors import ConfigError
from act_jax.serve import serving

_WORKDIR = vocab.define('workdir', required=True)
_TRACE = vocab.define('trace', help='Request trace to replay (or --listen).')
_LISTEN = vocab.define('listen')
_CLASSES = vocab.define('classes')
_CHUNK = vocab.define('prefill_chunk')
_SLO = vocab.define('slo_p95_ms')
_CONTROLLER = vocab.define('controller')
_THR = vocab.define('threshold', help='--controller=fixed: the exit threshold in (0, 1] '
                    '(default: the run\'s operating point).')
_MAX_LAYERS = vocab.define('max_layers')
_SLOTS = vocab.define('slots')
_UNCERT = vocab.define('allow_uncertified')
_OUT = vocab.define('out', help='Output directory (default: a fresh RUN/serve-<time>).')
_KV_FILL = vocab.define('kv_fill')
_COMPACT = vocab.define('compact')
_PER_CALL = vocab.define('steps_per_call')
_QUALITY = vocab.define('quality')
_STATIC = vocab.define('static_batches')
_MODE = vocab.define('mode', help='threshold: early exit at operating points; exact: '
                     'self-speculative decoding (full-depth output; --controller=fixed).')
_DRAFT_LAYER = vocab.define('draft_layer')
_DRAFT_LEN = vocab.define('draft_len')
_SHADOW = vocab.define('shadow_fraction')
_WINDOW = vocab.define('monitor_window')


def main(argv):
  del argv
  quiet_logs()
  options = serving.ServeOptions(
      controller=_CONTROLLER.value, slo_p95_ms=_SLO.value, threshold=_THR.value,
      max_layers=_MAX_LAYERS.value, allow_uncertified=_UNCERT.value, slots=_SLOTS.value,
      kv_fill=_KV_FILL.value, compact=_COMPACT.value, steps_per_call=_PER_CALL.value,
      static_batches=_STATIC.value, quality=_QUALITY.value, mode=_MODE.value,
      draft_layer=_DRAFT_LAYER.value, draft_len=_DRAFT_LEN.value,
      classes=tuple(_CLASSES.value), prefill_chunk=_CHUNK.value,
      shadow_fraction=_SHADOW.value, monitor_window=_WINDOW.value)
  if (_TRACE.value is None) == (_LISTEN.value is None):
    raise ConfigError('give --trace=... (replay a trace) or --listen=host:port (an HTTP '
                      'server), one of them')
  if _LISTEN.value is not None:
    if _STATIC.value:
      raise ConfigError('--static_batches applies to a trace replay, not --listen')
    if _OUT.value is not None and not _SHADOW.value:
      raise ConfigError('--out with --listen holds the drift monitor\'s shadow.jsonl: give '
                        '--shadow_fraction > 0 too')
    serving.serve_http(_WORKDIR.value, _LISTEN.value, options, out=_OUT.value)
    return
  serving.serve_run(_WORKDIR.value, _TRACE.value, options, out=_OUT.value)


if __name__ == '__main__':
  run(main)
