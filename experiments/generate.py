r"""Continues a prompt with early-exit decoding and shows where every byte came from.

  python -m experiments.generate --workdir=RUN --prompt='def fib(n):' --threshold=0.9
    threshold mode (approximate): each byte's exit layer.
  python -m experiments.generate --workdir=RUN --prompt='def fib(n):' --mode=exact
    exact mode (self-speculative): output identical to full-depth greedy decoding; the
    draft layer and length are the fastest measured on held-out prompts unless --draft_layer /
    --draft_len are given; --temperature > 0 samples with the speculative-sampling rule.
  python -m experiments.generate --workdir=runs/lm_default --datastore=runs/ds_flax \
      --prompt='class Dense(Module):' --retrieve=gate
    threshold mode with the retrieval arm: a third line marks the bytes that retrieved.
"""
from absl import flags

from experiments import define_max_layers_flag, quiet_logs, refuse_flags, run

from act_jax.errors import ConfigError
from act_jax.viz import listing

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_PROMPT = flags.DEFINE_string('prompt', 'def fib(n):', 'Prompt text.')
_MODE = flags.DEFINE_enum('mode', 'threshold', ['threshold', 'exact'],
                          'threshold: approximate early exit at an operating point; exact: '
                          'self-speculative decoding, output equal to full depth.')
_THR = flags.DEFINE_float('threshold', None, 'Exit threshold in (0, 1] (default: the run\'s '
                          'calibrated one, else the config default). Threshold mode.')
_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Bytes to generate.')
_FILL = flags.DEFINE_enum('kv_fill', 'project', ['project', 'copy', 'lazy'],
                          'KV of skipped layers (lazy: the same values, filled when needed).')
_MAX_LAYERS = define_max_layers_flag()
_DRAFT_LAYER = flags.DEFINE_integer('draft_layer', None, 'Exact mode: the exit layer that '
                                    'drafts (default: the fastest measured on held-out prompts).')
_DRAFT_LEN = flags.DEFINE_integer('draft_len', None, 'Exact mode: bytes drafted per verify '
                                  'step (default: the fastest measured on held-out prompts).')
_TEMP = flags.DEFINE_float('temperature', 0.0, 'Exact mode: 0 = greedy, > 0 = sampling.')
_SEED = flags.DEFINE_integer('seed', 0, 'Exact mode: sampling seed.')
_DATASTORE = flags.DEFINE_string('datastore', None, 'Threshold mode: a kNN datastore of this '
                                 'run (experiments.datastore) for the retrieval arm.')
_RETRIEVE = flags.DEFINE_enum('retrieve', 'gate', ['never', 'always', 'gate'],
                              'With --datastore: when a token retrieves.')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  quiet_logs()
  if _MODE.value == 'threshold':
    refuse_flags('threshold', ('draft_layer', 'draft_len', 'temperature', 'seed'))
    if _RETRIEVE.present and not _DATASTORE.value:
      raise ConfigError(f'--retrieve={_RETRIEVE.value}: applies with --datastore')
    if _DATASTORE.value:
      print(listing.retrieval_listing(_WORKDIR.value, _DATASTORE.value, _PROMPT.value,
                                       _RETRIEVE.value, _THR.value, _NEW.value, _FILL.value,
                                       _MAX_LAYERS.value))
      return
    print(listing.generate_listing(_WORKDIR.value, _PROMPT.value, _THR.value,
                                           _NEW.value, _FILL.value,
                                           max_layers=_MAX_LAYERS.value))
    return
  refuse_flags('exact', ('threshold', 'max_layers', 'kv_fill', 'datastore', 'retrieve'))
  print(listing.exact_listing(_WORKDIR.value, _PROMPT.value, _NEW.value,
                                           _DRAFT_LAYER.value, _DRAFT_LEN.value, _TEMP.value,
                                           _SEED.value))


if __name__ == '__main__':
  run(main)
