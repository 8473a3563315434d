r"""Pod-scale models: sized for TPU slices, checked from any machine by AOT compilation.

':arg' (comma-separated): size=125m|1b|8b (default 1b), kind=adaptive|moe|dense (default
adaptive; 'dense' alone also works), vocab=N (default 32768), runlocal.
* moe: a MoE FFN every other layer: 64 experts, top-2, one shared expert, expert hidden =
  d_ff / 3, so a token's active FFN parameters equal the dense layer's (2 routed + 1 shared
  experts of d_ff/3).
* adaptive: moe + CALM confidence exits after every 2-layer step. Training computes each
  exit's loss inside the depth scan by length tiles (act_jax/model/layers/head.py): no
  [N, B, L, V] logits, so it needs about what moe needs (docs/results.md).
* dense: the same transformer, dense FFN everywhere, no exits.
Both: bf16 compute, f32 parameters and Adam state, full rematerialisation, 1024-token
sequences, vocab 32768 (a production tokenizer's size; runs on the embedded byte corpus use
its first 260 ids), every cross-entropy over the vocabulary by 8 length tiles
(model.loss_tiles). Layout: FSDP over the slice (mesh.fsdp=-1 takes every device the other
axes leave), experts split 4 ways (mesh.expert=4; use 8 on slices of 64+ chips).

  pip install -e '.[tpu]'
  python -m experiments.compile --config=experiments/configs/pod.py:size=1b,kind=moe \
      --topology=v5e:4x4
  python -m experiments.compile --config=experiments/configs/pod.py:size=1b \
      --topology=v5e:4x4     # adaptive: fits, as moe does
  python -m experiments.compile --config=experiments/configs/pod.py:size=1b,dense \
      --topology=v5e:4x4 --config.mesh.fsdp=1 --config.mesh.data=-1   # replicated: refused
  python -m experiments.compile --config=experiments/configs/pod.py:size=8b,kind=moe \
      --topology=v5p:4x4x4 --config.mesh.expert=8

What these compiles report per chip (memory against HBM, MFU estimates, collectives; which
layouts fit and which are refused): docs/results.md ("Pod-scale compiles").
"""
from act_jax import config as config_lib
from act_jax.errors import ConfigError

SIZES = {  # d_model, heads, layers, dense d_ff (SwiGLU), global batch (sequences)
    '125m': dict(d_model=768, num_heads=12, num_layers=12, d_ff=2048, batch=256),
    '1b': dict(d_model=2048, num_heads=16, num_layers=16, d_ff=5632, batch=256),
    '8b': dict(d_model=4096, num_heads=32, num_layers=32, d_ff=14336, batch=256),
}


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  size = args.pop('size', '1b')
  if size not in SIZES:
    raise ConfigError(f'pod.py size={size!r}: known sizes {", ".join(SIZES)}')
  kind = 'dense' if args.pop('dense', False) else args.pop('kind', 'adaptive')
  text = args.pop('vocab', '32768')
  vocab = int(text) if isinstance(text, str) and text.isdigit() else 0
  if vocab < 260:
    raise ConfigError(f'pod.py vocab={text!r}: an integer >= 260 (the byte tokenizer\'s ids)')
  if kind not in ('adaptive', 'moe', 'dense'):
    raise ConfigError(f'pod.py kind={kind!r}: one of adaptive, moe, dense')
  dense = kind == 'dense'
  s = dict(SIZES[size])
  config = config_lib.default_config()
  config.data.update(name='stdlib', seq_len=1024, batch_size=s.pop('batch'))
  # loss_tiles: every cross-entropy over the vocabulary by 8 length tiles (128 tokens of a
  # row at a time), the final head's and each exit's: no [B,L,V] or [N,B,L,V] in training
  config.model.update(vocab_size=vocab, dtype='bfloat16', param_dtype='float32',
                      remat='full', tie_embeddings=False, loss_tiles=8, **s)
  config.mesh.update(data=1, fsdp=-1, expert=1 if dense else 4, model=1)
  config.train.update(steps=10_000, warmup_steps=500, lr=3e-4, eval_every=1000,
                      checkpoint_every=500)
  if kind == 'adaptive':
    config.halting.name = 'confidence'
  if not dense:
    config.moe.update(router='top_k', num_experts=64, top_k=2, shared_experts=1, every=2,
                      d_ff=s['d_ff'] // 3, capacity_factor=1.25)
  return config_lib.apply_common_args(config, args)
