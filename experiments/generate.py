r"""Continues a prompt with early-exit decoding and shows the exit layer of every token.

  python -m experiments.generate --workdir=RUN --prompt='def fib(n):' --threshold=0.9
"""
from absl import flags

from experiments import define_max_layers_flag, quiet_logs, run

from act_jax import operating_point

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_PROMPT = flags.DEFINE_string('prompt', 'def fib(n):', 'Prompt text.')
_THR = flags.DEFINE_float('threshold', None, 'Exit threshold in (0, 1] (default: the run\'s '
                          'calibrated one, else the config default).')
_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Bytes to generate.')
_FILL = flags.DEFINE_enum('kv_fill', 'project', ['project', 'copy', 'lazy'],
                          'KV of skipped layers (lazy: the same values, filled when needed).')
_MAX_LAYERS = define_max_layers_flag()
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  quiet_logs()
  print(operating_point.generate_listing(_WORKDIR.value, _PROMPT.value, _THR.value,
                                         _NEW.value, _FILL.value,
                                         max_layers=_MAX_LAYERS.value))


if __name__ == '__main__':
  run(main)
