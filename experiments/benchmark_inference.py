r"""Decode speed vs full depth for a range of thresholds, measured side by side in one run.

  python -m experiments.benchmark_inference --workdir=RUN
"""
from absl import flags

from experiments import define_max_layers_flag, quiet_logs, run

from act_jax import operating_point

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_THR = flags.DEFINE_list('thresholds', ['0.99', '0.95', '0.9', '0.8', '0.6', '0.4'], 'Thresholds.')
_BATCH = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Decode batch sizes.')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'Generated tokens per timing.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timings per point (median).')
_FILL = flags.DEFINE_enum('kv_fill', 'project', ['project', 'copy', 'lazy'],
                          'KV of skipped layers (lazy: the same values, filled when needed).')
_MAX_LAYERS = define_max_layers_flag()
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  quiet_logs()
  rows = operating_point.benchmark_rows(_WORKDIR.value, [float(t) for t in _THR.value],
                                        [int(b) for b in _BATCH.value],
                                        new_tokens=_NEW.value, repeats=_REPEATS.value,
                                        kv_fill=_FILL.value, max_layers=_MAX_LAYERS.value)
  print(operating_point.format_table(rows))


if __name__ == '__main__':
  run(main)
