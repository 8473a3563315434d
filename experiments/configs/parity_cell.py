r"""Parity with the paper's step model: a recurrent cell reads the whole ±1/0 vector at every
step (act_jax/model/step_cell.py), the PonderNet extrapolation protocol.

Variants: halting=<policy> (default pondernet), bits=<vector length, default 96>,
cell=gru|elman (default gru), runlocal (8 entries, trains in seconds).

The task and protocol (Banino et al. 2021, "PonderNet: Learning to Ponder", sec. 3.1 and
3.2, following Graves 2016 sec. 3.1): vectors of `bits` entries of which d are +1 or -1 and
the rest 0, target = parity of the number of +1 entries; training draws d in 1..bits/2,
evaluation 1..bits, so the summary prints accuracy, mean steps and Spearman for the
in-distribution range and for the extrapolation range bits/2+1..bits separately.
Sizes and optimiser as used for PonderNet's parity runs (its appendix on the parity
experiments): one recurrent cell of 128 units shared by every step, a linear halting unit
and a linear output head on its state, batch 128, Adam at a constant learning rate 3e-4,
β = 0.01 on KL(p ‖ p_G), prior λ_p = 0.1, at most 20 steps. These values were taken from
the paper as we read it; the paper text was not at hand in this repository's reference
store to re-check each number, so treat them as the paper's recipe to be confirmed, not
as verified. What is ours: the global-norm clip at 1 (library default) and the number of
training steps (the CPU budget; docs/results.md "Compute vs difficulty" gives each run's).
ACT uses the same network with Graves's ponder cost τ = 1e-3 and ε = 0.01.

  python -m experiments.train \
      --config=experiments/configs/parity_cell.py:halting=pondernet --workdir=runs/cell_pn
  python -m experiments.sweep_seeds \
      --config=experiments/configs/parity_cell.py:halting=pondernet --num_seeds=5 \
      --workdir=runs/sweep_cell96_pn
  python -m experiments.report --workdir=runs/sweep_cell96_pn   # steps vs difficulty
Measured results (accuracy in / beyond the training range, steps, Spearman on the integer
halting step and on the expected steps, collapse, CPU minutes): docs/results.md
("Compute vs difficulty").
"""
from act_jax import config as config_lib
from act_jax.model import step_cell

PAPER = dict(d_model=128, num_layers=20, batch_size=128, lr=3e-4, beta=0.01, lambda_p=0.1)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  runlocal = bool(args.get('runlocal'))
  cell = args.pop('cell', 'gru')
  if cell not in step_cell.STEP_CELLS:
    raise config_lib.ConfigError(f'cell={cell!r}: known: {", ".join(step_cell.STEP_CELLS)}')
  try:
    bits = int(args.pop('bits', 8 if runlocal else 96))
  except ValueError:
    raise config_lib.ConfigError('bits: must be an integer (parity vector length)')
  if bits < 2:
    raise config_lib.ConfigError(f'bits={bits}: parity needs at least 2 entries')
  args.setdefault('halting', 'pondernet')
  config = config_lib.default_config()
  config.model.update(kind=cell, d_model=PAPER['d_model'], num_layers=PAPER['num_layers'])
  # PonderNet's protocol: train on up to half the entries non-zero, evaluate on all of them
  config.data.update(name='parity_vector', num_bits=bits, seq_len=bits,
                     batch_size=PAPER['batch_size'], train_max_difficulty=bits // 2)
  # Adam at a constant rate: no warmup, no decay, no weight decay, Adam's default b2
  config.train.update(steps=20000, lr=PAPER['lr'], warmup_steps=0, min_lr_ratio=1.0,
                      weight_decay=0.0, b1=0.9, b2=0.999, log_every=500, eval_every=5000,
                      eval_batches=16, checkpoint_every=5000)
  config.halting.update(beta=PAPER['beta'], lambda_p=PAPER['lambda_p'], threshold=0.5,
                        ponder_cost=1e-3, eps=0.01)
  config = config_lib.apply_common_args(config, args)
  if runlocal:  # apply_common_args sized a transformer; the cell's own small size
    config.model.update(d_model=32, num_layers=6)
    config.data.update(seq_len=bits, batch_size=64)
    config.train.update(steps=400, lr=3e-3, log_every=100, eval_every=400, eval_batches=4,
                        checkpoint_every=400, warmup_steps=0)
  return config
