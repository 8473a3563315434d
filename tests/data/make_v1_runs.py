"""Wrote tests/data/v1_runs with the code of commit 15b760f (before the resolved spec): tiny
runs in the on-disk format of that version plus reference outputs, so tests can check that
checkpoints written before the spec refactor still load and compute the same numbers.

  python tests/data/make_v1_runs.py tests/data/v1_runs      # only at that commit
"""
import os, shutil, sys
import numpy as np
import jax, jax.numpy as jnp
from act_jax.train import training
from act_jax.infer import inference
from act_jax.run import directory as run_lib
from experiments.configs import lm

out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
specs = {
  'learned_exit_moe': 'halting=learned_exit,router=top_k,runlocal',
  'act_dense': 'halting=act,router=none,runlocal',
}
for name, arg in specs.items():
  c = lm.get_config(arg)
  c.train.update(steps=2, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1,
                 checkpoint_every=2, keep_checkpoints=1, async_checkpointing=False)
  c.data.update(max_bytes=50_000)
  if c.moe.router != 'none':
    c.moe.bias_rate = 0.01
  wd = os.path.join(out, name)
  training.train_and_evaluate(c, wd, log=lambda s: None)
  # drop things the test does not need
  for f in os.listdir(wd):
    if f not in ('config.json', 'checkpoints'):
      p = os.path.join(wd, f)
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  config, state, _ = run_lib.load(wd)
  v = {'params': state['params'], 'moe_state': state['moe_state']}
  rng = np.random.RandomState(0)
  tokens = rng.randint(1, 256, size=(2, 12)).astype(np.int32)
  ref = {'tokens': tokens}
  for thr in (0.3, 0.9, 2.0):
    logits, aux = inference.forward_while(config, v, jnp.asarray(tokens), thr)
    ref[f'logits_{thr}'] = np.asarray(logits)
    ref[f'layers_{thr}'] = np.asarray(aux['layers'])
  g = inference.generate(config, v, tokens[:, :4], 6, 0.5)
  ref['gen_tokens'] = np.asarray(g['tokens'])
  ref['gen_layers'] = np.asarray(g['layers'])
  np.savez(os.path.join(wd, 'reference.npz'), **ref)
print('ok')
