r"""Serving benchmarks side by side in one run: decode efficiency per operating point, the SLO
controller vs fixed full depth under a bursty trace, continuous vs static batching.

  python -m experiments.calibrate --workdir=RUN --caps=0,4,2 --measure=accuracy --tolerance=0.05
  python -m experiments.benchmark_serving --workdir=RUN
Without --trace the bursty trace (10 s bursts every 25 s) is sized from the capacities
measured closed loop (base 0.3x full depth, peak 1.25x but at most 0.95x the cheapest
point's) and without --slo_p95_ms the budget is 3x a lone request's full-depth latency.
Prints the tables (docs/results.md has measured ones); --out=DIR also writes them to
DIR/benchmark_serving.json.
"""
import os

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.bench import serving as serving_bench
from act_jax.run import directory as run_lib
from act_jax.spec import OperatingPoint

_WORKDIR = vocab.define('workdir', required=True, help='A calibrated training run.')
_TRACE = vocab.define('trace', help='Bursty trace (default: sized from the measured capacity).')
_SLO = vocab.define('slo_p95_ms', help='p95 budget in ms (default: 3x a lone request).')
_SLOTS = vocab.define('slots')
_DURATION = vocab.define('duration_s')
_PEAK = vocab.define('peak_over_capacity')
_UNCERT = vocab.define('allow_uncertified')
_KV_FILL = vocab.define('kv_fill', help='KV fill of the served runs (the efficiency table shows '
                        'both).')
_PER_CALL = vocab.define('steps_per_call')
_EFF = vocab.define('efficiency_points')
_PARTS = vocab.define('parts', list(serving_bench.PARTS))
_OUT = vocab.define('out', help='Also write the tables to OUT/benchmark_serving.json.')
vocab.retired('json', 'write --out=DIR instead (the tables go to DIR/benchmark_serving.json)')
RESULT = 'benchmark_serving.json'


def _points(values: list[str] | None) -> list[OperatingPoint]:
  out = []
  for v in values or ():
    thr, _, cap = v.partition('@')
    out.append(OperatingPoint(float(thr), int(cap) if cap else None))
  return out


def main(argv):
  del argv
  quiet_logs()
  res = serving_bench.benchmark(_WORKDIR.value, _TRACE.value, _SLO.value, _SLOTS.value,
                                _DURATION.value, _PEAK.value,
                                allow_uncertified=_UNCERT.value, kv_fill=_KV_FILL.value,
                                steps_per_call=_PER_CALL.value,
                                efficiency_points=_points(_EFF.value), parts=_PARTS.value)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    run_lib.write_json(os.path.join(_OUT.value, RESULT), res, default=float)
    print(f'wrote {os.path.join(_OUT.value, RESULT)}')


if __name__ == '__main__':
  run(main)
