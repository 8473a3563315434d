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
from experiments import quiet_logs, refuse_flags, run
from experiments import vocabulary as vocab

from act_jax.errors import ConfigError
from act_jax.viz import listing

_WORKDIR = vocab.define('workdir', required=True)
_PROMPT = vocab.define('prompt')
_MODE = vocab.define('mode')
_THR = vocab.define('threshold', help='Threshold mode: the exit threshold in (0, 1] (default: '
                    'the run\'s calibrated one, else the config default).')
_NEW = vocab.define('max_new_tokens')
_FILL = vocab.define('kv_fill')
_MAX_LAYERS = vocab.define('max_layers')
_DRAFT_LAYER = vocab.define('draft_layer')
_DRAFT_LEN = vocab.define('draft_len')
_TEMP = vocab.define('temperature')
_SEED = vocab.define('seed', help='Exact mode: sampling seed.')
_DATASTORE = vocab.define('datastore', help='Threshold mode: a kNN datastore of this run '
                          '(experiments.datastore) for the retrieval arm.')
_RETRIEVE = vocab.define('retrieve')


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
