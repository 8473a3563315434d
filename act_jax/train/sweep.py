"""Seed sweeps: does a halting policy learn depth that follows difficulty on every seed?

One config is trained once per seed (seed s in WORKDIR/seed_s, each an ordinary run that
resumes like `experiments.train`), then each run's held-out evaluation becomes one row:

  accuracy, sequence accuracy   held-out, at the run's default threshold
  steps                         mean layers executed per scored token, and vs full depth
  Spearman                      rank correlation of steps with difficulty, over examples
  expected steps, its Spearman  the continuous count (PonderNet Σ n·p_n at full depth, ACT
                                N + R; training.continuous_steps): no ties between examples
  ranges                        the same for the in-distribution / extrapolation splits
                                (data.train_max_difficulty; PonderNet's 1-48 vs 49-96)
  collapsed                     telemetry.collapse on the exit-depth histogram: >= 90 % of
                                scored tokens at one depth (step 1, the maximum, or any
                                constant step in between)

collapse rate = collapsed seeds / seeds. ACT and Universal-Transformer ACT runs are known to
collapse on most seeds without a deep-start halting bias and a warmed-up ponder cost
(Graves 2016; Dehghani et al. 2019; see halting.bias_init and halting.cost_warmup).

`sweep_seeds` writes WORKDIR/sweep.json (rows + the per-difficulty steps each seed measured,
which `report.plot_steps_vs_difficulty` draws as one line per seed).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from act_jax import config as config_lib
from act_jax import data as data_lib
from act_jax import telemetry
from act_jax.errors import ConfigError
from act_jax.run import directory as run_lib
from act_jax.train import training

SWEEP_FILE = 'sweep.json'
COLLAPSE_FRAC = 0.9


def seed_row(spec, seed: int, res: dict[str, float]) -> dict[str, Any]:
  """One seed's evaluation as a flat row (plain floats; json-ready)."""
  full = spec.model.num_layers
  per_diff = training.by_difficulty(res, 'layers_mean')
  acc_diff = training.by_difficulty(res, 'accuracy')
  row = {'seed': int(seed), 'accuracy': res['accuracy'],
         'sequence_accuracy': res.get('sequence_accuracy', math.nan),
         'steps': res['layers_mean'], 'full': full,
         'spearman': res.get('spearman_layers_difficulty', math.nan),
         'expected_steps': res.get('expected_steps_mean', math.nan),
         'spearman_expected': res.get('spearman_expected_steps_difficulty', math.nan),
         'collapse': telemetry.collapse(training.depth_hist(res), full, COLLAPSE_FRAC),
         'steps_by_difficulty': {str(d): v for d, v in per_diff.items()},
         'accuracy_by_difficulty': {str(d): v for d, v in acc_diff.items()},
         'ranges': {}}
  for name in data_lib.difficulty_ranges(spec.data):
    row['ranges'][name] = {k: res.get(f'range_{name}/{k}', math.nan) for k in
                           ('accuracy', 'sequence_accuracy', 'layers_mean', 'spearman',
                            'expected_steps', 'spearman_expected')}
  return row


def sweep_seeds(config: Any, workdir: str, seeds: Sequence[int],
                log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains `config` under each seed (WORKDIR/seed_<s>, resumed if present), writes and
  returns the sweep summary {'seeds': rows, 'collapse_rate', 'config', 'ranges'}."""
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ConfigError(f'seeds={seeds}: need one or more distinct non-negative seeds')
  config = config_lib.complete(config)
  spec = config_lib.as_spec(config)  # validates once, before any training
  config_lib.check_training(spec)
  run_lib.check_output_dir(workdir, '--workdir', (SWEEP_FILE, 'seed_*'), 'a seed sweep')
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for i, seed in enumerate(seeds):
    cfg = config_lib.complete(config)
    cfg.seed = seed
    run_dir = os.path.join(workdir, f'seed_{seed}')
    log(f'== seed {seed} ({i + 1}/{len(seeds)}): {run_dir} ==')
    res = training.train_and_evaluate(cfg, run_dir, log=lambda m, s=seed: log(f'[seed {s}] {m}'))
    rows.append(seed_row(spec, seed, res))
    _write(workdir, spec, rows)  # after every seed: a killed sweep keeps what it measured
  return _write(workdir, spec, rows)


def _write(workdir: str, spec, rows: list[dict]) -> dict[str, Any]:
  out = {'seeds': rows,
         'collapse_rate': sum(bool(r['collapse']) for r in rows) / len(rows),
         'halting': spec.halting.name, 'task': spec.data.name,
         'ranges': {k: list(v) for k, v in data_lib.difficulty_ranges(spec.data).items()},
         'config': {k: v for k, v in spec.to_dict().items() if k != 'seed'}}
  run_lib.write_json(os.path.join(workdir, SWEEP_FILE), out, indent=1)
  return out


def read_sweep(workdir: str) -> dict[str, Any] | None:
  return run_lib.read_json(os.path.join(workdir, SWEEP_FILE))


def format_sweep(sweep: dict[str, Any]) -> str:
  """The per-seed table, then means and the collapse rate."""
  rows = sweep['seeds']
  ranges = list(sweep.get('ranges') or {})
  head = f'{"seed":>4} {"acc":>6} {"seq acc":>7} {"steps":>11} {"Spearman":>8}'
  for name in ranges:
    head += f' | {name[:8]:>8} acc steps rho E[N]rho'
  head += '  collapsed'
  lines = [f'== {sweep["task"]} / {sweep["halting"]}: {len(rows)} seed(s) ==', head]
  for r in rows:
    line = (f'{r["seed"]:>4} {r["accuracy"]:>6.3f} {r["sequence_accuracy"]:>7.3f} '
            f'{r["steps"]:>5.2f} of {r["full"]:<3} {r["spearman"]:>8.3f}')
    for name in ranges:
      g = r['ranges'][name]
      line += (f' | {g["accuracy"]:>12.3f} {g["layers_mean"]:>5.2f} {g["spearman"]:>5.2f} '
               f'{g.get("spearman_expected", math.nan):>7.2f}')
    lines.append(line + f'  {r["collapse"] or "no"}')
  mean = lambda k: float(np.nanmean([r[k] for r in rows]))
  lines.append(f'mean: accuracy {mean("accuracy"):.3f}, steps {mean("steps"):.2f} of '
               f'{rows[0]["full"]} ({rows[0]["full"] / max(mean("steps"), 1e-9):.2f}x fewer '
               f'than the maximum), Spearman {mean("spearman"):.3f} (on expected steps '
               f'{float(np.nanmean([r.get("spearman_expected", math.nan) for r in rows])):.3f})'
               f'; collapse rate '
               f'{sweep["collapse_rate"]:.0%} ({sum(bool(r["collapse"]) for r in rows)}/'
               f'{len(rows)})')
  return '\n'.join(lines)
