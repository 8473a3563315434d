"""The compute-quality frontier of a run: fewest mean layers at an accuracy tolerance.

`accuracy_frontier` (the `frontier` binary) picks, per depth cap, the threshold with the fewest
mean layers whose held-out accuracy drop stays within the tolerance on one half of the batches
and reports it on the other half, next to static truncation (every token exits at layer k).
`plot_frontier` draws a calibration sweep (RUN/calibration.png).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from act_jax import data as data_lib
from act_jax.calibrate.operating_point import require_exits, sweep
from act_jax.errors import ConfigError
from act_jax.run import directory as run_lib
from act_jax.spec import OperatingPoint


def accuracy_frontier(workdir: str, thresholds: Sequence[float],
                      max_layers: Sequence[Optional[int]] = (None,), tolerance: float = 0.01,
                      num_batches: int = 16, log: Callable[[str], None] = print) -> dict:
  """Fewest mean layers at <= `tolerance` RELATIVE held-out accuracy drop, per depth cap.

  For each cap, the threshold is chosen on the calibration half of the held-out batches (the
  most aggressive one whose drop there is <= tolerance) and reported on the other half, next
  to the static-truncation baseline (every token leaves at layer k) on that half. A point
  estimate, not a guarantee: `calibrate_run` gives the Learn-then-Test one (consistency)."""
  spec, variables, step = run_lib.load(workdir)
  require_exits(spec)
  if not 0 < tolerance < 1:
    raise ConfigError(f'--tolerance={tolerance}: must be in (0, 1)')
  for cap in max_layers:
    OperatingPoint(0.5, cap).validate(spec)  # bad caps fail before any sweep
  batches = data_lib.make_dataset(spec.data, spec.seed).eval_batches(num_batches)
  calib, test = batches[0::2], batches[1::2]
  if not test:
    raise ConfigError(f'--num_batches={num_batches}: need at least 2 (calibration + test)')
  depth = spec.model.num_layers
  rows = []
  for cap in max_layers:
    log(f'max_layers={cap or depth}: calibration half')
    cal = sweep(spec, variables, calib, thresholds, log, cap)
    log(f'max_layers={cap or depth}: test half')
    tst = sweep(spec, variables, test, thresholds, log, cap)
    drop = lambda sw, i: (sw['full_accuracy'] - sw['accuracy'][i]) / sw['full_accuracy']
    ok = [i for i in range(len(thresholds)) if drop(cal, i) <= tolerance]
    row = {'max_layers': cap or depth, 'threshold': None}
    if ok:
      i = min(ok, key=lambda i: cal['mean_layers'][i])
      row.update(threshold=float(thresholds[i]), calib_mean_layers=cal['mean_layers'][i],
                 mean_layers=tst['mean_layers'][i], accuracy=tst['accuracy'][i],
                 relative_drop=drop(tst, i), fewer_layers=depth / tst['mean_layers'][i])
    rows.append(row)
  static = tst.get('static') or {'layers': [], 'accuracy': []}
  full = tst['full_accuracy']
  fits = [(k, a) for k, a in zip(static['layers'], static['accuracy'])
          if (full - a) / full <= tolerance]
  return {'tolerance': tolerance, 'full_accuracy': full, 'n_test_tokens': tst['n'],
          'depth': depth, 'rows': rows, 'static': static,
          'static_best': None if not fits else {'layers': fits[0][0], 'accuracy': fits[0][1],
                                                'fewer_layers': depth / fits[0][0]}}


def format_frontier(res: dict) -> str:
  lines = [f'held-out test half: {res["n_test_tokens"]} tokens, full-depth accuracy '
           f'{res["full_accuracy"]:.4f}; tolerance {res["tolerance"]:.2%} relative drop',
           f'{"max_layers":>10} {"threshold":>9} {"layers":>7} {"fewer":>7} {"accuracy":>8} '
           f'{"drop":>7}']
  for r in res['rows']:
    if r['threshold'] is None:
      lines.append(f'{r["max_layers"]:>10} {"none fits":>9}')
      continue
    lines.append(f'{r["max_layers"]:>10} {r["threshold"]:>9g} {r["mean_layers"]:>7.2f} '
                 f'{r["fewer_layers"]:>6.2f}x {r["accuracy"]:>8.4f} {r["relative_drop"]:>+7.2%}')
  sb = res['static_best']
  lines.append('static truncation (all tokens exit at layer k): ' + (
      'none within tolerance' if sb is None else
      f'{sb["layers"]} layers, {sb["fewer_layers"]:.2f}x fewer, accuracy {sb["accuracy"]:.4f}'))
  return '\n'.join(lines)


def plot_frontier(result: dict, path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fr = result['frontier']
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  sc = a1.scatter(fr['mean_layers'], fr['accuracy'], c=fr['ms_per_token'], cmap='viridis')
  fig.colorbar(sc, ax=a1, label='ms / token (batch 1 decode)')
  for t, x, y in zip(fr['thresholds'], fr['mean_layers'], fr['accuracy']):
    a1.annotate(f'{t:g}', (x, y), fontsize=7, xytext=(3, 3), textcoords='offset points')
  a1.axhline(result['full_depth']['accuracy'], color='gray', ls='--', label='full depth')
  if result.get('static'):
    a1.plot(result['static']['layers'], result['static']['accuracy'], 's:', color='tab:orange',
            label='static truncation (all tokens exit at layer k)')
  if result['chosen_threshold'] is not None:
    a1.scatter([result['test']['mean_layers']], [result['test']['accuracy']], s=160,
               facecolors='none', edgecolors='red', label=f'chosen {result["chosen_threshold"]:g}')
  a1.set(xlabel='mean layers executed / token', ylabel='held-out next-token accuracy',
         title=f'{result["policy"]}: quality vs compute (test split)')
  a1.legend(fontsize=8)
  a2.plot(fr['mean_layers'], fr['ms_per_token'], 'o-')
  a2.axhline(result['full_depth']['ms_per_token'], color='gray', ls='--', label='full depth')
  a2.set(xlabel='mean layers executed / token', ylabel='ms / token',
         title='measured decode latency')
  a2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
