r"""Serving benchmarks side by side in one run: decode efficiency per operating point, the SLO
controller vs fixed full depth under a bursty trace, continuous vs static batching.

  python -m experiments.calibrate --workdir=RUN --caps=0,4,2 --measure=accuracy --tolerance=0.05
  python -m experiments.benchmark_serving --workdir=RUN
Without --trace the bursty trace (10 s bursts every 25 s) is sized from the capacities
measured closed loop (base 0.3x full depth, peak 1.25x but at most 0.95x the cheapest
point's) and without
--slo_p95_ms the budget is 3x a lone request's full-depth latency.
Prints the tables (README "Serving under a latency budget" has the measured ones).
"""
import json

from absl import flags

from experiments import quiet_logs, run

from act_jax.bench import serving as serving_bench
from act_jax.errors import ConfigError
from act_jax.spec import OperatingPoint

_WORKDIR = flags.DEFINE_string('workdir', None, 'A calibrated training workdir.')
_TRACE = flags.DEFINE_string('trace', None, 'Bursty trace (default: sized from capacity).')
_SLO = flags.DEFINE_float('slo_p95_ms', None, 'p95 budget (default: 3x a lone request).')
_SLOTS = flags.DEFINE_integer('slots', 8, 'Rows of the running batch.')
_DURATION = flags.DEFINE_float('duration_s', 60.0, 'Length of the generated traces.')
_PEAK = flags.DEFINE_float('peak_over_capacity', 1.25, 'Burst rate / full-depth capacity.')
_UNCERT = flags.DEFINE_bool('allow_uncertified', False, 'Controller may use uncertified points.')
_KV_FILL = flags.DEFINE_enum('kv_fill', 'project', ['project', 'copy', 'lazy'],
                             'KV fill of the served runs (the efficiency table shows both).')
_PER_CALL = flags.DEFINE_integer('steps_per_call', 4, 'Decode steps per device call.')
_EFF = flags.DEFINE_list('efficiency_points', None, 'Points of the efficiency table besides '
                         'full depth, THRESHOLD or THRESHOLD@CAP (default: up to 3 usable '
                         'points of calibration.json).')
_PARTS = flags.DEFINE_list('parts', list(serving_bench.PARTS), 'Which benchmarks to run.')
_JSON = flags.DEFINE_string('json', None, 'Also write the tables to this JSON file.')
flags.mark_flag_as_required('workdir')


def _points(values):
  if not values:
    return ()
  out = []
  for v in values:
    thr, _, cap = v.partition('@')
    try:
      out.append(OperatingPoint(float(thr), int(cap) if cap else None))
    except ValueError:
      raise ConfigError(f'--efficiency_points: {v!r} is not THRESHOLD or THRESHOLD@CAP')
  return out


def main(argv):
  del argv
  quiet_logs()
  for name, v in (('--slots', _SLOTS.value), ('--duration_s', _DURATION.value),
                  ('--steps_per_call', _PER_CALL.value),
                  ('--peak_over_capacity', _PEAK.value)):
    if not v > 0:
      raise ConfigError(f'{name}={v}: must be > 0')
  res = serving_bench.benchmark(_WORKDIR.value, _TRACE.value, _SLO.value, _SLOTS.value,
                                _DURATION.value, _PEAK.value,
                                allow_uncertified=_UNCERT.value, kv_fill=_KV_FILL.value,
                                steps_per_call=_PER_CALL.value,
                                efficiency_points=_points(_EFF.value), parts=_PARTS.value)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(res, f, indent=2, default=float)


if __name__ == '__main__':
  run(main)
