r"""Synthetic tasks with a known difficulty per example: parity, addition, hops.

Variants: task=parity|addition|hops (default parity), bits=<parity vector length, default 96>,
halting=<policy>, router=<router>, runlocal.

Parity follows the PonderNet protocol (Banino et al. 2021, sec. 3.2): vectors of `bits`
entries, training on 1..bits/2 non-zero entries, evaluation on 1..bits, so the summary
prints accuracy, mean steps and Spearman(steps, non-zeros) for the in-distribution range and
for the extrapolation range bits/2+1..bits separately.

  python -m experiments.train \
      --config=experiments/configs/synthetic.py:task=parity,halting=pondernet --workdir=runs/pn
  The published size (96 entries) is meant for an accelerator host. CPU sizes: `bits=32`
  (3000 steps) or `bits=16` (1500 steps).

  python -m experiments.sweep_seeds \
      --config=experiments/configs/synthetic.py:task=parity,bits=16,halting=pondernet \
      --num_seeds=5 --workdir=runs/sweep_p16_pn
  Per seed: accuracy, steps, Spearman and whether the depth collapsed; the collapse rate.
  The looped transformer (Fan et al. 2024: the shared block re-reads the input embedding
  every step) is the same config with --config.model.inject_input=True.
  Measured results (times, accuracy, steps, Spearman, collapse, extrapolation):
  docs/results.md ("Compute vs difficulty").

ACT here starts deep and pays for depth late (the Universal Transformer recipe): halting
bias -3 (p ~ 0.05 per step, so ~8 steps run at init) and the ponder cost ramped in over the
first third of training (halting.cost_warmup). With the library default (bias -2, full cost
from step 0) the hardest rows got the fewest steps (docs/results.md).
PonderNet uses a stronger prior than the library default (beta 0.1, lambda_p 0.3, halting
at the median, threshold 0.5): with beta 0.01 / lambda_p 0.2 / threshold 0.9 the halting
distribution stayed late (docs/results.md).
"""
from act_jax import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  task = args.pop('task', 'parity')
  bits = args.pop('bits', None)
  if bits is not None and task != 'parity':
    raise config_lib.ConfigError(f'bits={bits}: only task=parity has a vector length')
  try:
    bits = int(bits if bits is not None else (16 if args.get('runlocal') else 96))
  except ValueError:
    raise config_lib.ConfigError(f'bits={bits!r}: must be an integer (parity vector length)')
  config = config_lib.default_config()
  config.data.name = task
  config.model.update(d_model=64, num_heads=4, d_ff=128, num_layers=8, share_weights=True)
  config.train.update(steps=1500, lr=1e-3, warmup_steps=100, eval_every=500, eval_batches=8,
                      checkpoint_every=500)
  config.data.update(batch_size=32, num_bits=16, max_digits=4)
  if task == 'parity':
    config.model.causal = False
    if bits < 2:
      raise config_lib.ConfigError(f'bits={bits}: parity needs at least 2 entries')
    # PonderNet: train on up to half the entries non-zero, evaluate on all of them
    config.data.update(num_bits=bits, seq_len=bits + 2, train_max_difficulty=bits // 2)
    if bits > 16:
      config.train.update(steps=3000, eval_every=1000, checkpoint_every=500)
  elif task == 'hops':
    config.model.causal = False
    config.data.seq_len = 2 * config.data.num_nodes + 4
  else:
    config.data.seq_len = 20
  config.halting.update(beta=0.1, lambda_p=0.3)  # PonderNet: see the docstring
  config = config_lib.apply_common_args(config, args)
  if task in ('parity', 'hops'):  # runlocal shortens seq_len; these need the whole input
    config.data.seq_len = (bits + 2 if task == 'parity' else 2 * config.data.num_nodes + 4)
  if config.halting.name == 'pondernet':
    config.halting.threshold = 0.5  # halt at the median of the halting distribution
  if config.halting.name == 'act':  # start deep, pay for depth late (see the docstring)
    config.halting.update(bias_init=-3.0, cost_warmup=config.train.steps // 3)
  return config
