"""Operating points of a trained run: sweep thresholds, calibrate with a guarantee, time it.

What the `calibrate`, `generate` and `benchmark_inference` binaries (and notebook 3) call.
- `sweep`: for each candidate threshold, the held-out mean layers executed, accuracy, and the
  consistency with the full-depth model (fraction of tokens whose prediction is unchanged),
  run with inference.forward_while — the loop that really stops.
- `calibrate_run`: Learn-then-Test (act_jax.calibrate.ltt) on a calibration half of the
  held-out batches, reported on the other half; or the threshold that meets a mean-layers
  budget. Writes RUN/calibration.json and RUN/calibration.png.
- `time_decode` / `benchmark_rows`: wall-clock decoding per threshold vs full depth, measured
  side by side in one process.
- `train_and_certify`: `experiments.train`'s call: train, then (train.certify_tolerance > 0)
  certify the run's operating point with `calibrate_run(measure='accuracy')` and print the
  layers it saves per domain, so the default run ends at a guaranteed point, not a guess.

Dims: B batch, L length.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax import config as config_lib
from act_jax import data as data_lib
from act_jax.calibrate import ltt as calibration
from act_jax.errors import ConfigError
from act_jax.infer import inference
from act_jax.model.halting import POLICIES
from act_jax.run import directory as run_lib
from act_jax.spec import NEVER_EXIT, OperatingPoint, Spec
from act_jax.train import training

MEASURES = ('consistency', 'accuracy')  # what calibrate's tolerance bounds
# Conservative -> aggressive (a token exits when its score >= threshold).
DEFAULT_THRESHOLDS = (1.0, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6,
                      0.5, 0.4, 0.3, 0.2, 0.1)
# The end-of-training certification (train_and_certify): every other candidate, to keep the
# default run short; fixed-sequence testing spends the full risk on each in turn, so fewer
# candidates lose no power, only resolution.
CERTIFY_THRESHOLDS = (1.0, 0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3)


def require_exits(spec: Spec) -> None:
  """ConfigError unless the run's policy has an inference-time exit (policy.can_exit)."""
  if not spec.policy.can_exit:
    able = [n for n, c in sorted(POLICIES.items()) if c.can_exit]
    raise ConfigError(
        f'halting.name={spec.halting.name!r} has no inference-time exit to calibrate; '
        f'calibration needs a policy that can exit: {", ".join(able)}')


def run_operating_point(workdir: str, spec: Spec, threshold: Optional[float] = None,
                        max_layers: Optional[int] = None) -> tuple[OperatingPoint, str]:
  """THE default operating point of a run, what every binary uses: (point, where from).

  The user's --threshold / --max_layers when given; else the threshold (and cap) certified
  in RUN/calibration.json; else the policy's default (spec.default_operating_point: ACT
  1 − ε, the others halting.threshold). A --max_layers alone caps the calibrated (or
  default) threshold; a --threshold alone runs uncapped (the calibrated cap was certified
  with the calibrated threshold, not the user's)."""
  source = 'the policy default'
  op = spec.default_operating_point
  saved = run_lib.read_calibration(workdir) if threshold is None else None
  if saved and saved.get('chosen_threshold') is not None:
    op = OperatingPoint(float(saved['chosen_threshold']), saved.get('max_layers'))
    source = run_lib.path(workdir, run_lib.CALIBRATION)
  if threshold is not None:
    inference.check_threshold(threshold, '--threshold')
    op, source = OperatingPoint(float(threshold)), '--threshold'
  if max_layers is not None:
    op = OperatingPoint(op.threshold, max_layers)
    source += ', --max_layers'
  return op.validate(spec, '--threshold'), source


@functools.lru_cache(maxsize=8)
def _jitted_forward(spec: Spec):
  """One compiled while-loop forward per spec, shared by every sweep (frontier, calibrate)."""
  return jax.jit(lambda v, t, th: inference.forward_while(spec, v, t, th))


def sweep(spec, variables: dict, batches: Sequence[dict], thresholds: Sequence[float],
          log: Callable[[str], None] = lambda s: None,
          max_layers: Optional[int] = None) -> dict:
  """Per threshold (capped at max_layers when given): mean layers, accuracy, errors vs full
  depth over scored tokens, plus the static-truncation baseline."""
  spec = config_lib.as_spec(spec)
  fwd = _jitted_forward(spec)
  full_arg = OperatingPoint.full_depth().vector(spec)
  full, static_correct = [], 0.0
  w = [np.asarray(b['weights']) > 0 for b in batches]
  for b, m in zip(batches, w):
    logits, aux = fwd(variables, jnp.asarray(b['inputs']), full_arg)
    full.append(np.asarray(jnp.argmax(logits, -1)))
    if 'step_logits' in aux:  # every exit head ran: what a static shallower model would give
      pred_NBL = np.asarray(jnp.argmax(aux['step_logits'], -1))
      static_correct = static_correct + ((pred_NBL == b['targets']) & m).sum((1, 2))
  n = int(sum(x.sum() for x in w))
  full_acc = sum(((f == b['targets']) & m).sum() for f, b, m in zip(full, batches, w)) / max(n, 1)
  out = {k: [] for k in ('mean_layers', 'accuracy', 'num_errors', 'consistency', 'broken',
                         'fixed')}
  t0 = time.time()
  for k, thr in enumerate(thresholds):
    layers = correct = errors = broken = fixed = 0.0
    thr_arg = OperatingPoint(thr, max_layers).vector(spec)
    for b, f, m in zip(batches, full, w):
      logits, aux = fwd(variables, jnp.asarray(b['inputs']), thr_arg)
      pred = np.asarray(jnp.argmax(logits, -1))
      layers += float((np.asarray(aux['layers']) * m).sum())
      correct += float(((pred == b['targets']) & m).sum())
      errors += float(((pred != f) & m).sum())
      full_ok, ok = f == b['targets'], pred == b['targets']
      broken += float((full_ok & ~ok & m).sum())  # d = +1: the exit loses a right answer
      fixed += float((~full_ok & ok & m).sum())   # d = -1: the exit finds one
    out['mean_layers'].append(layers / n)
    out['accuracy'].append(correct / n)
    out['num_errors'].append(int(errors))
    out['consistency'].append(1.0 - errors / n)
    out['broken'].append(int(broken))
    out['fixed'].append(int(fixed))
    done = k + 1
    eta = (time.time() - t0) / done * (len(thresholds) - done)
    log(f'  threshold {thr:<6g} layers {layers / n:5.2f} acc {correct / n:.4f} '
        f'consistency {1 - errors / n:.4f}  [{done}/{len(thresholds)}, ETA {eta:.0f}s]')
  out.update(thresholds=[float(t) for t in thresholds], n=n, full_accuracy=float(full_acc),
             full_layers=float(spec.model.num_layers))
  if np.ndim(static_correct):
    # Static truncation baseline: every token leaves at the same exit (1-based layers).
    per_step = spec.model.num_layers // len(static_correct)
    out['static'] = {'layers': [per_step * (i + 1) for i in range(len(static_correct))],
                     'accuracy': [float(c) / n for c in static_correct]}
  return out


def time_decode(spec, variables: dict, prompt_BL: np.ndarray, thresholds: Sequence[float],
                new_tokens: int, repeats: int = 3, compact: bool = False,
                kv_fill: str = 'project', max_layers: Optional[int] = None) -> dict:
  """Median ms per generated token and mean layers, per threshold (one compile; the points
  are timed in turn, `repeats` rounds).

  With max_layers every point but NEVER_EXIT (the full-depth reference) is capped; every
  point is its OperatingPoint's per-step vector, so all share one compiled function."""
  ms, layers = [], []
  spec = config_lib.as_spec(spec)

  def arg(thr):
    if thr >= NEVER_EXIT:
      return OperatingPoint.full_depth().vector(spec)
    return OperatingPoint(thr, max_layers).vector(spec)

  run = lambda thr: inference.generate(spec, variables, prompt_BL, new_tokens, arg(thr),
                                       kv_fill=kv_fill, compact=compact)
  jax.block_until_ready(run(float(thresholds[0])))  # compile once: the vectors are traced
  times: list[list[float]] = [[] for _ in thresholds]
  outs: list = [None] * len(thresholds)
  for _ in range(repeats):  # round-robin: a noisy neighbour hits every point alike
    for k, thr in enumerate(thresholds):
      t = time.perf_counter()
      outs[k] = jax.block_until_ready(run(float(thr)))
      times[k].append(time.perf_counter() - t)
  for k in range(len(thresholds)):
    ms.append(1e3 * float(np.median(times[k])) / (new_tokens * prompt_BL.shape[0]))
    layers.append(float(np.mean(outs[k]['layers'])))
  return {'thresholds': [float(t) for t in thresholds], 'ms_per_token': ms,
          'mean_layers': layers}


def eval_prompts(spec, batch: int, length: int) -> np.ndarray:
  """Held-out prompts (alternating code / prose rows) for timing."""
  ds = data_lib.make_dataset(spec.data, spec.seed)
  rows = np.concatenate([b['inputs'] for b in ds.eval_batches(max(1, -(-batch // spec.data.batch_size)))])
  return rows[:batch, :length]


def calibrate_run(workdir: str, tolerance: float = 0.01, risk: float = 0.05,
                  budget_layers: Optional[float] = None,
                  thresholds: Sequence[float] = DEFAULT_THRESHOLDS, num_batches: int = 16,
                  method: str = 'binomial', time_tokens: int = 32,
                  log: Callable[[str], None] = print,
                  max_layers: Optional[int] = None, measure: str = 'consistency',
                  caps: Optional[Sequence[Optional[int]]] = None) -> dict:
  """Picks the operating point on half the held-out batches, reports it on the other half.

  measure='consistency': at most `tolerance` of the tokens may change their prediction vs
  full depth; 'accuracy': the held-out accuracy may drop by at most `tolerance` RELATIVE to
  full depth (turned into an absolute bound with the calibration half's full accuracy).
  max_layers caps depth at every candidate threshold (the cap is part of the operating point).

  caps (instead of max_layers; None or 0 = uncapped): certify the thresholds under each cap,
  every cap's fixed sequence at risk / len(caps) (Bonferroni), so that ALL certified points
  hold together with probability >= 1 - risk; the chosen point is the certified one with the
  fewest calibration layers. result['points'] lists every (threshold, cap) tried with its
  `certified` flag: the frontier a serving controller moves along (act_jax/serve/serving.py)."""
  spec, variables, step = run_lib.load(workdir)
  require_exits(spec)
  for name, v in (('tolerance', tolerance), ('risk', risk)):
    if not 0 < v < 1:
      raise ConfigError(f'--{name}={v}: must be in (0, 1)')
  if budget_layers is not None and not 0 < budget_layers <= spec.model.num_layers:
    raise ConfigError(f'--budget_layers={budget_layers}: must be in (0, '
                      f'{spec.model.num_layers}] (the model depth)')
  OperatingPoint(0.5, max_layers).validate(spec)  # a bad cap fails before any sweep
  if measure not in MEASURES:
    raise ConfigError(f'--measure={measure!r}: allowed: {", ".join(MEASURES)}')
  ds = data_lib.make_dataset(spec.data, spec.seed)
  batches = ds.eval_batches(num_batches)
  calib, test = batches[0::2], batches[1::2]
  if not test:
    raise ConfigError(f'--num_batches={num_batches}: need at least 2 (calibration + test)')
  if caps is not None:
    if max_layers is not None:
      raise ConfigError('give --max_layers or --caps, not both')
    caps = [None if c in (None, 0, spec.model.num_layers) else int(c) for c in caps]
    if not caps or len(set(caps)) != len(caps):
      raise ConfigError(f'--caps={caps}: give distinct depth caps (0 = uncapped)')
    if budget_layers is not None:
      raise ConfigError('--caps certifies points with Learn-then-Test; drop --budget_layers')
    for c in caps:
      OperatingPoint(0.5, c).validate(spec)
  family = caps if caps is not None else [max_layers]
  level = risk / len(family)  # Bonferroni over the caps: all certified points hold jointly
  per_cap, points = {}, []
  for cap in family:
    tag = '' if cap is None else f' (cap {cap})'
    log(f'calibration split ({len(calib)} batches){tag}:')
    cal = sweep(spec, variables, calib, thresholds, log, cap)
    log(f'test split ({len(test)} batches){tag}:')
    tst = sweep(spec, variables, test, thresholds, log, cap)
    if budget_layers is not None:
      chosen = calibration.budget_select(thresholds, cal['mean_layers'], budget_layers)
      index = None if chosen is None else list(thresholds).index(chosen)
      mode, pvalues, valid = 'budget', None, [False] * len(thresholds)
    else:
      if measure == 'accuracy':  # refuses too little data, like ltt_select
        sel = calibration.ltt_select_accuracy(thresholds, cal['n'], cal['broken'],
                                              cal['fixed'], tolerance * cal['full_accuracy'],
                                              level)
        method = 'bernstein'
      else:
        sel = calibration.ltt_select(thresholds, None, cal['n'], tolerance, level, method,
                                     num_errors=cal['num_errors'])
      index, chosen, mode = sel['index'], sel['threshold'], 'ltt'
      pvalues, valid = [float(p) for p in sel['pvalues']], [bool(v) for v in sel['valid']]
    per_cap[cap] = (cal, tst, index, chosen, pvalues)
    for k, thr in enumerate(thresholds):
      points.append({'threshold': float(thr), 'max_layers': cap, 'certified': valid[k],
                     'pvalue': None if pvalues is None else pvalues[k],
                     'calib_mean_layers': cal['mean_layers'][k],
                     'mean_layers': tst['mean_layers'][k], 'accuracy': tst['accuracy'][k],
                     'consistency': tst['consistency'][k]})
  # The chosen cap: the one whose chosen point runs the fewest calibration layers.
  max_layers = min(family, key=lambda c: (per_cap[c][2] is None,
                                          per_cap[c][0]['mean_layers'][per_cap[c][2] or 0]))
  cal, tst, index, chosen, pvalues = per_cap[max_layers]
  limit = spec.model.max_len
  time_tokens = min(time_tokens, limit // 2)
  log(f'timing decode (batch 1, {time_tokens} tokens) per threshold ...')
  prompt = eval_prompts(spec, 1, min(16, limit - time_tokens))
  # full depth timed side by side with the thresholds (same compiled function, round-robin)
  timing = time_decode(spec, variables, prompt, [NEVER_EXIT] + list(thresholds),
                       time_tokens, repeats=3, max_layers=max_layers)
  full_ms = timing['ms_per_token'][0]
  timing = {k: v[1:] for k, v in timing.items()}
  pick = (lambda sw: {k: sw[k][index] for k in ('mean_layers', 'accuracy', 'consistency')}
          if index is not None else {'mean_layers': sw['full_layers'],
                                     'accuracy': sw['full_accuracy'], 'consistency': 1.0})
  result = {
      'workdir': os.path.abspath(workdir), 'step': step,
      'policy': spec.halting.name, 'mode': mode, 'method': method, 'measure': measure,
      'tolerance': tolerance, 'risk': risk, 'budget_layers': budget_layers,
      'max_layers': max_layers, 'caps': caps,
      'chosen_threshold': chosen, 'full_layers': float(spec.model.num_layers),
      'n_calib_tokens': cal['n'], 'n_test_tokens': tst['n'],
      'full_depth': {'accuracy': tst['full_accuracy'], 'ms_per_token': full_ms},
      'calib': pick(cal), 'test': pick(tst),
      'static': tst.get('static'),
      'frontier': {'thresholds': list(map(float, thresholds)), 'pvalues': pvalues,
                   'mean_layers': tst['mean_layers'], 'accuracy': tst['accuracy'],
                   'consistency': tst['consistency'], 'ms_per_token': timing['ms_per_token'],
                   'calib_mean_layers': cal['mean_layers'],
                   'calib_consistency': cal['consistency']},
      # every (threshold, cap) tried; `certified`: passed the test (all jointly, 1 - risk)
      'points': points,
  }
  if index is not None:
    result['test']['ms_per_token'] = timing['ms_per_token'][index]
    result['test']['speedup_layers'] = spec.model.num_layers / result['test']['mean_layers']
    result['test']['speedup_wall'] = full_ms / timing['ms_per_token'][index]
  # atomic: a kill while certifying (now the end of every default run) leaves the old file
  run_lib.write_calibration(workdir, result)
  plot_frontier(result, run_lib.path(workdir, run_lib.CALIBRATION_PLOT))
  return result


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


def benchmark_rows(workdir: str, thresholds: Sequence[float], batch_sizes: Sequence[int] = (1, 8),
                   prompt_len: int = 16, new_tokens: int = 64, repeats: int = 3,
                   log: Callable[[str], None] = print, kv_fill: str = 'project',
                   max_layers: Optional[int] = None) -> list[dict]:
  """Decode speed per threshold against full depth, side by side in one process."""
  spec, variables, step = run_lib.load(workdir)
  OperatingPoint(0.5, max_layers).validate(spec)  # a bad cap fails before any timing
  limit = spec.model.max_len
  new_tokens = min(new_tokens, limit - prompt_len)
  rows = []
  full_layers = spec.model.num_layers
  for b in batch_sizes:
    prompt = eval_prompts(spec, b, prompt_len)
    for compact in ((False, True) if b > 1 else (False,)):
      log(f'batch {b} compact={compact}: timing {len(thresholds) + 1} operating points ...')
      t = time_decode(spec, variables, prompt, [NEVER_EXIT] + list(thresholds),
                      new_tokens, repeats, compact, kv_fill, max_layers)
      full_ms = t['ms_per_token'][0]
      for thr, ms, layers in zip(t['thresholds'][1:], t['ms_per_token'][1:], t['mean_layers'][1:]):
        ideal = full_layers / max(layers, 1e-9)
        rows.append({'batch': b, 'compact': compact, 'threshold': thr, 'mean_layers': layers,
                     'ms_per_token': ms, 'tokens_per_sec': 1e3 / ms, 'full_ms': full_ms,
                     'speedup': full_ms / ms, 'ideal': ideal,
                     'efficiency': (full_ms / ms) / ideal})
  return rows


def format_table(rows: list[dict]) -> str:
  head = (f'{"batch":>5} {"compact":>7} {"thresh":>7} {"layers":>7} {"tok/s":>9} '
          f'{"ms/tok":>8} {"full ms":>8} {"speedup":>8} {"L/mean":>7} {"eff":>5}')
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(f'{r["batch"]:>5} {str(r["compact"]):>7} {r["threshold"]:>7g} '
                 f'{r["mean_layers"]:>7.2f} {r["tokens_per_sec"]:>9.1f} {r["ms_per_token"]:>8.3f} '
                 f'{r["full_ms"]:>8.3f} {r["speedup"]:>7.2f}x {r["ideal"]:>6.2f}x '
                 f'{r["efficiency"]:>5.2f}')
  return '\n'.join(lines)


def evaluate_run(workdir: str, thresholds: Sequence[Optional[float]] = (None,),
                 num_batches: Optional[int] = None,
                 log: Callable[[str], None] = print,
                 max_layers: Optional[int] = None) -> list[dict]:
  """Held-out quality and compute of a trained run at one or more thresholds (None = the
  run's operating point, run_operating_point): per domain, per difficulty bucket, and
  Spearman(layers, difficulty). Logs an evaluation summary per point."""
  spec, variables, step = run_lib.load(workdir)
  points = [run_operating_point(workdir, spec, thr, max_layers) for thr in thresholds]
  n = num_batches or spec.train.eval_batches
  ds = data_lib.make_dataset(spec.data, spec.seed)
  batches = ds.eval_batches(n)
  eval_step = jax.jit(training.make_eval_step(spec))
  rows = []
  for op, source in points:
    res = training.evaluate(spec, variables, eval_step, batches, ds.domains,
                            threshold=op.vector(spec))
    log(training.evaluation_summary(spec, res, ds.domains, workdir, step, op,
                                    source, n))
    rows.append({'threshold': op.threshold, 'max_layers': op.max_layers, **res})
  return rows


def train_and_certify(config, workdir: str, log: Callable[[str], None] = print,
                      cluster=None, num_batches: int = 16, risk: float = 0.05) -> dict:
  """training.train_and_evaluate, then, when config.train.certify_tolerance > 0 and the
  policy exits, the accuracy Learn-then-Test certification of `calibrate --measure=accuracy`
  (RUN/calibration.json: every binary then serves at that point) and a summary block of the
  layers saved at it, overall and per domain, on the test half of the held-out batches.
  Returns the training evaluation with 'certified/*' entries added."""
  res = training.train_and_evaluate(config, workdir, log=log, cluster=cluster)
  spec = config_lib.as_spec(config_lib.complete(config) if not isinstance(config, Spec)
                            else config)
  tol = spec.train.certify_tolerance
  if tol <= 0:
    return res
  if not POLICIES[spec.halting.name].can_exit:
    log(f'certification skipped: halting.name={spec.halting.name!r} has no exits')
    return res
  if spec.quant.scheme != 'none':
    # the checkpoint keeps float master weights: certify the model that will be served
    log(f'certification deferred: a quantization-aware run (quant.scheme='
        f'{spec.quant.scheme!r}) is served quantized; experiments.quantize --workdir={workdir} '
        f'--scheme={spec.quant.scheme} certifies the quantized run')
    return res
  if jax.process_count() > 1:
    log('certification skipped in a multi-process run: run python -m experiments.calibrate '
        f'--workdir={workdir} --measure=accuracy on one host')
    return res
  t0 = time.time()
  quiet = lambda m: None  # noqa: E731 -- the block below says what matters
  try:
    cal = calibrate_run(workdir, tolerance=tol, risk=risk, measure='accuracy',
                        thresholds=CERTIFY_THRESHOLDS, num_batches=num_batches, log=quiet)
  except ConfigError as e:  # too few held-out tokens to certify this tolerance
    log(f'certification skipped: {e}')
    return res
  spec, variables, step = run_lib.load(workdir)
  ds = data_lib.make_dataset(spec.data, spec.seed)
  test = ds.eval_batches(num_batches)[1::2]
  eval_step = jax.jit(training.make_eval_step(spec))
  full_op = OperatingPoint.full_depth()
  full = training.evaluate(spec, variables, eval_step, test, ds.domains,
                           threshold=full_op.vector(spec))
  n_layers = spec.model.num_layers
  lines = [f'== certified operating point (<= {tol:.1%} relative accuracy drop vs full '
           f'depth, risk {risk}; {cal["n_calib_tokens"]:,} calibration tokens) ==']
  if cal['chosen_threshold'] is None:
    lines.append('no threshold certified: the run stays at full depth (more held-out data or '
                 'a looser tolerance may certify one)')
    at = full
  else:
    op = OperatingPoint(float(cal['chosen_threshold']), cal['max_layers'])
    at = training.evaluate(spec, variables, eval_step, test, ds.domains, threshold=op.vector(spec))
    lines.append(f'threshold {op.threshold:g}: {at["layers_mean"]:.2f} of {n_layers} layers '
                 f'({n_layers / at["layers_mean"]:.2f}x fewer than full depth), accuracy '
                 f'{at["accuracy"]:.4f} vs {full["accuracy"]:.4f} at full depth '
                 f'({_rel(at["accuracy"], full["accuracy"])}) on the test half '
                 f'({cal["n_test_tokens"]:,} tokens)')
  for d in ds.domains:
    if f'{d}/accuracy' in at:
      lines.append(f'  {d:>8}: {at[f"{d}/layers_mean"]:.2f} layers '
                   f'({n_layers / at[f"{d}/layers_mean"]:.2f}x fewer), accuracy '
                   f'{at[f"{d}/accuracy"]:.4f} vs {full[f"{d}/accuracy"]:.4f} '
                   f'({_rel(at[f"{d}/accuracy"], full[f"{d}/accuracy"])})')
  lines.append(f'wrote {workdir}/calibration.json: evaluate, generate, serve and '
               f'benchmark_inference use this point ({time.time() - t0:.0f} s)')
  log('\n'.join(lines))
  res = dict(res)
  res['certified/threshold'] = (math.nan if cal['chosen_threshold'] is None
                                else float(cal['chosen_threshold']))
  res['certified/layers_mean'] = at['layers_mean']
  res['certified/accuracy'] = at['accuracy']
  res['certified/full_accuracy'] = full['accuracy']
  for d in ds.domains:
    if f'{d}/layers_mean' in at:
      res[f'certified/{d}/layers_mean'] = at[f'{d}/layers_mean']
  return res


def _rel(x: float, ref: float) -> str:
  return f'{(x - ref) / ref:+.2%}' if ref > 0 else 'n/a'
