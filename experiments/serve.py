r"""Replays a request trace through a continuous-batching early-exit server on a trained run.

  python -m experiments.calibrate --workdir=RUN --caps=0,4,2      # certified points first
  python -m experiments.serve --workdir=RUN \
      --trace=bursty:base=2,peak=12,duration=60s --slo_p95_ms=800 --controller=slo
  python -m experiments.serve --workdir=RUN --trace=my_traffic.jsonl --controller=fixed \
      --threshold=0.9 --max_layers=4
  python -m experiments.serve --workdir=RUN --trace=poisson:rate=4,duration=30s \
      --controller=fixed --mode=exact      # self-speculative: full-depth output
Traces: `poisson:rate=R,duration=D`, `bursty:base=B,peak=P,duration=D[,period=20s,burst=6s]`
(both: seed=, prompt=16-64, new=16-48, code=0.5), or a JSONL file with one request per line:
{"arrival_s": 0.5, "prompt": "def f(", "max_new": 32} (or "prompt_len" + "domain").
Writes requests.jsonl, steps.jsonl, summary.json and serve.png into --out (default
RUN/serve-<time>/) and prints the summary and the per-exit latency table.
"""
from absl import flags

from experiments import define_max_layers_flag, quiet_logs, run

from act_jax.serve import serving

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (config.json + checkpoints).')
_TRACE = flags.DEFINE_string('trace', None, 'poisson:..., bursty:... or a .jsonl file.')
_SLO = flags.DEFINE_float('slo_p95_ms', None, 'p95 request latency budget (ms).')
_CONTROLLER = flags.DEFINE_enum('controller', 'slo', ['slo', 'fixed'], 'slo: move along the '
                                'certified points of calibration.json to meet the budget; '
                                'fixed: one point.')
_THR = flags.DEFINE_float('threshold', None, '--controller=fixed: the exit threshold '
                          '(default: the run\'s operating point).')
_MAX_LAYERS = define_max_layers_flag()
_SLOTS = flags.DEFINE_integer('slots', 8, 'Rows of the running batch.')
_UNCERT = flags.DEFINE_bool('allow_uncertified', False, 'Let the controller use points that '
                            'failed the Learn-then-Test certification.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (default: a fresh RUN/serve-<time>).')
_KV_FILL = flags.DEFINE_enum('kv_fill', 'project', ['project', 'lazy', 'copy'],
                             'K/V of skipped layers: project (at once), lazy (the same values, '
                             'filled when a later token first needs them) or copy.')
_COMPACT = flags.DEFINE_bool('compact', False, 'Rows that exited stop costing compute '
                             '(buckets B, B/2, ...) instead of waiting for the slowest row.')
_PER_CALL = flags.DEFINE_integer('steps_per_call', 4, 'Decode steps per device call (multi-'
                                 'step scheduling: admission and the controller act between '
                                 'calls; bytes of a call are delivered when it returns).')
_QUALITY = flags.DEFINE_bool('quality', True, 'After the replay, decode every request at full '
                             'depth and report the bytes identical to it.')
_STATIC = flags.DEFINE_bool('static_batches', False, 'Baseline: wait for a full batch and run '
                            'it to its longest request (no continuous batching).')
_MODE = flags.DEFINE_enum('mode', 'threshold', ['threshold', 'exact'],
                          'threshold: early exit at operating points; exact: self-speculative '
                          'decoding (full-depth output; --controller=fixed).')
_DRAFT_LAYER = flags.DEFINE_integer('draft_layer', None, 'Exact mode: the drafting exit layer '
                                    '(default: the fastest measured on held-out prompts).')
_DRAFT_LEN = flags.DEFINE_integer('draft_len', None, 'Exact mode: bytes drafted per round '
                                  '(default: the fastest measured on held-out prompts).')
flags.mark_flags_as_required(['workdir', 'trace'])


def main(argv):
  del argv
  quiet_logs()
  serving.serve_run(_WORKDIR.value, _TRACE.value, _SLO.value, _CONTROLLER.value, _THR.value,
                    _MAX_LAYERS.value, _SLOTS.value, _UNCERT.value, _OUT.value,
                    _KV_FILL.value, _COMPACT.value, _QUALITY.value, _STATIC.value,
                    _PER_CALL.value, mode=_MODE.value, draft_layer=_DRAFT_LAYER.value,
                    draft_len=_DRAFT_LEN.value)


if __name__ == '__main__':
  run(main)
