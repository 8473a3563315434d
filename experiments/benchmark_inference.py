r"""Decode speed vs full depth, measured side by side in one run.

  python -m experiments.benchmark_inference --workdir=RUN
    threshold mode: a range of thresholds vs full depth.
  python -m experiments.benchmark_inference --workdir=RUN --mode=exact
    exact mode (self-speculative) vs full depth vs threshold mode at the run's operating
    point (calibrated, if any): bytes/s, output agreement with full depth, bytes per verify
    step; then acceptance per draft layer and domain (code / prose).
"""
from absl import flags

from experiments import define_max_layers_flag, quiet_logs, refuse_flags, run

from act_jax.calibrate import operating_point

from act_jax.bench import speculative as speculative_bench
from act_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_MODE = flags.DEFINE_enum('mode', 'threshold', ['threshold', 'exact'],
                          'threshold: a range of thresholds; exact: self-speculative decoding.')
_THR = flags.DEFINE_list('thresholds', ['0.99', '0.95', '0.9', '0.8', '0.6', '0.4'],
                         'Thresholds (threshold mode; exact mode compares with the first one '
                         'only when given, else the run\'s operating point).')
_BATCH = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Decode batch sizes.')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'Generated tokens per timing.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Exact mode: held-out prompt bytes.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timings per point (median).')
_FILL = flags.DEFINE_enum('kv_fill', 'project', ['project', 'copy', 'lazy'],
                          'KV of skipped layers (lazy: the same values, filled when needed).')
_MAX_LAYERS = define_max_layers_flag()
_DRAFT_LAYER = flags.DEFINE_integer('draft_layer', None, 'Exact mode: the drafting exit layer '
                                    '(default: the fastest measured on held-out prompts).')
_DRAFT_LEN = flags.DEFINE_integer('draft_len', None, 'Exact mode: bytes drafted per verify '
                                  'step (default: the fastest measured on held-out prompts).')
_LAYER_TABLE = flags.DEFINE_bool('layer_table', True, 'Exact mode: also time every draft layer '
                                 'on code and prose prompts.')
flags.mark_flag_as_required('workdir')


def _ints(name: str, values: list[str]) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise ConfigError(f'--{name}={",".join(values)}: must be positive integers') from None
  if not out or min(out) < 1:
    raise ConfigError(f'--{name}={",".join(values)}: must be positive integers')
  return out


def _floats(name: str, values: list[str]) -> list[float]:
  try:
    return [float(v) for v in values]
  except ValueError:
    raise ConfigError(f'--{name}={",".join(values)}: must be numbers in (0, 1]') from None


def main(argv):
  del argv
  quiet_logs()
  batches = _ints('batch_sizes', _BATCH.value)
  if _MODE.value == 'threshold':
    refuse_flags('threshold', ('draft_layer', 'draft_len', 'prompt_len', 'layer_table'))
    rows = operating_point.benchmark_rows(_WORKDIR.value, _floats('thresholds', _THR.value),
                                          batches, new_tokens=_NEW.value,
                                          repeats=_REPEATS.value, kv_fill=_FILL.value,
                                          max_layers=_MAX_LAYERS.value)
    print(operating_point.format_table(rows))
    return
  refuse_flags('exact', ('max_layers', 'kv_fill'))
  thr = _floats('thresholds', _THR.value)[0] if flags.FLAGS['thresholds'].present else None
  res = speculative_bench.benchmark(_WORKDIR.value, batches, _PROMPT_LEN.value, _NEW.value,
                                    _REPEATS.value, _DRAFT_LAYER.value, _DRAFT_LEN.value, thr,
                                    _LAYER_TABLE.value)
  print(speculative_bench.format_benchmark(res))


if __name__ == '__main__':
  run(main)
