"""Certifying a run's operating point: Learn-then-Test on held-out data, or a layer budget.

- `calibrate_run` (the `calibrate` binary): Learn-then-Test (act_jax/calibrate/ltt.py) on a
  calibration half of the held-out batches, reported on the other half; or the threshold that
  meets a mean-layers budget. Writes RUN/calibration.json and RUN/calibration.png.
- `train_and_certify` (the `train` binary): train, then (train.certify_tolerance > 0) certify
  with `calibrate_run(measure='accuracy')` and print the layers it saves per domain, so the
  default run ends at a guaranteed point, not a guess.
- `certify_from_serving` (`calibrate --from_serving=DIR`): the same Learn-then-Test on the
  shadow tokens a server scored on live traffic (DIR/shadow.jsonl, act_jax/serve/monitor.py)
  instead of held-out data, so last week's traffic becomes a new calibration.json.

Dims: B batch, L length.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable, Optional, Sequence

import jax

from act_jax import config as config_lib
from act_jax import data as data_lib
from act_jax.calibrate import counts as counts_lib
from act_jax.calibrate import ltt as calibration
from act_jax.calibrate.counts import MEASURES, SHADOW_LOG
from act_jax.calibrate.frontier import plot_frontier
from act_jax.calibrate.operating_point import (DEFAULT_THRESHOLDS, eval_prompts, require_exits,
                                               sweep, time_decode)
from act_jax.errors import ConfigError
from act_jax.model.halting import POLICIES
from act_jax.run import directory as run_lib
from act_jax.spec import NEVER_EXIT, OperatingPoint, Spec
from act_jax.train import training




# The end-of-training certification (train_and_certify): every other candidate, to keep the
# default run short; fixed-sequence testing spends the full risk on each in turn, so fewer
# candidates lose no power, only resolution.
CERTIFY_THRESHOLDS = (1.0, 0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3)


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
  `certified` flag: the frontier a serving controller moves along (act_jax/serve/slo.py)."""
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


def certify_from_serving(workdir: str, serving_dir: str, tolerance: Optional[float] = None,
                         risk: Optional[float] = None, measure: Optional[str] = None,
                         log: Callable[[str], None] = print) -> dict:
  """Learn-then-Test on a serving log's shadow tokens; writes RUN/calibration.json.

  Requests alternate between a calibration half (even) and a test half (odd), as calibrate
  splits its held-out batches. The points are tested in the log's order (the chain serve
  used, most accurate first, by offline cost: fixed before this data was seen), every point
  the server scored, not only the previously certified ones. tolerance / risk / measure
  default to the log's (those of the calibration the server monitored). The chosen point is
  the cheapest certified one; the file lists every point with its `certified` flag, like
  calibrate's, so every binary reads it alike."""
  spec = run_lib.read_config(workdir)
  header, rows = counts_lib.read_shadow_log(serving_dir)
  measure = measure or header['measure']
  tolerance = float(header['tolerance'] if tolerance is None else tolerance)
  risk = float(header['risk'] if risk is None else risk)
  if measure not in MEASURES:
    raise ConfigError(f'--measure={measure!r}: allowed: {", ".join(MEASURES)}')
  for name, v in (('tolerance', tolerance), ('risk', risk)):
    if not 0 < v < 1:
      raise ConfigError(f'--{name}={v}: must be in (0, 1)')
  points = header['points']
  for p in points[1:]:
    OperatingPoint(float(p['threshold']), p['max_layers']).validate(
        spec, f'{SHADOW_LOG}: threshold', f'{SHADOW_LOG}: max_layers')

  cal, tst = (functools.reduce(counts_lib.add, rows[h::2]) for h in (0, 1))
  chain = list(range(1, len(points)))
  n = cal.n
  sel = calibration.select_in_order(measure, n, cal.errors[1:], cal.broken[1:], cal.fixed[1:],
                                    cal.full_correct, tolerance, risk)
  method = 'bernstein' if measure == 'accuracy' else 'binomial'
  valid = [True] + [bool(v) for v in sel['valid']]
  index = max(i for i, v in enumerate(valid) if v)

  cal_st, tst_st = counts_lib.stats(cal), counts_lib.stats(tst)

  def at(st: dict, i: int) -> dict:
    return {'mean_layers': st['mean_layers'][i], 'accuracy': st['accuracy'][i],
            'consistency': st['agreement'][i]}

  chosen = None if index == 0 else points[index]
  listed = [{'threshold': float(p['threshold']), 'max_layers': p['max_layers'],
             'certified': valid[i], 'pvalue': float(sel['pvalues'][i - 1]),
             'calib_mean_layers': cal_st['mean_layers'][i], **at(tst_st, i)}
            for i, p in enumerate(points) if i > 0]
  result = {
      'workdir': os.path.abspath(workdir), 'step': None, 'policy': spec.halting.name,
      'mode': 'ltt', 'method': method, 'measure': measure, 'tolerance': tolerance,
      'risk': risk, 'budget_layers': None,
      'max_layers': None if chosen is None else chosen['max_layers'], 'caps': None,
      'chosen_threshold': None if chosen is None else float(chosen['threshold']),
      'full_layers': float(spec.model.num_layers),
      'n_calib_tokens': n, 'n_test_tokens': tst.n,
      'full_depth': {'accuracy': tst_st['full_accuracy']},
      'calib': at(cal_st, index), 'test': at(tst_st, index),
      'frontier': {'thresholds': [p['threshold'] for p in listed],
                   'pvalues': [p['pvalue'] for p in listed],
                   'mean_layers': [p['mean_layers'] for p in listed],
                   'accuracy': [p['accuracy'] for p in listed],
                   'consistency': [p['consistency'] for p in listed],
                   'calib_mean_layers': [p['calib_mean_layers'] for p in listed]},
      'points': listed,
      'source': {'from_serving': os.path.abspath(serving_dir), 'requests': len(rows),
                 'shadow_fraction': header.get('fraction')},
  }
  run_lib.write_calibration(workdir, result)  # atomic, as calibrate's
  got = ('full depth (no point certified)' if chosen is None else 'threshold ' + OperatingPoint(
      float(chosen['threshold']), chosen['max_layers']).label)
  log(f'{len(rows)} shadowed requests ({n} calibration + {tst.n} test tokens): '
      f'{sum(valid) - 1} of {len(chain)} points certified at {measure} tolerance '
      f'{tolerance:g}, risk {risk:g}; chosen {got}; test half: '
      f'{result["test"]["mean_layers"]:.2f} layers, consistency '
      f'{result["test"]["consistency"]:.4f}')
  return result


def _rel(x: float, ref: float) -> str:
  return f'{(x - ref) / ref:+.2%}' if ref > 0 else 'n/a'
