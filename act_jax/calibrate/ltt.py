"""Choosing an early-exit operating point with a finite-sample guarantee.

Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021, "Learn then Test:
Calibrating Predictive Algorithms to Achieve Risk Control") as used for early exit by CALM
(Schuster et al. 2022, "Confident Adaptive Language Modeling").

A token leaves the network at the first exit n whose confidence conf[t, n] ≥ λ (else at the
last exit). Candidate thresholds λ_1 > λ_2 > … run from conservative to aggressive. On n
calibration tokens, the empirical risk of λ_i is

  r̂_i = (1/n) Σ_t [pred at exit(t; λ_i) ≠ full-model pred_t]      (k_i = n·r̂_i errors).

Each λ_i gets a p-value for the null hypothesis H_i: "true risk > tolerance δ_tol":

  binomial   p_i = P(Binom(n, δ_tol) ≤ k_i) = Σ_{j≤k_i} C(n,j) δ_tol^j (1−δ_tol)^(n−j)
  Hoeffding  p_i = exp(−2n (δ_tol − r̂_i)_+²)

Fixed-sequence testing walks i = 1, 2, … and stops at the first p_i > risk_level (δ);
every λ before it is valid and the last valid (most aggressive) one is chosen. With
probability ≥ 1 − δ over the calibration draw, the chosen λ has risk ≤ δ_tol on new data
from the same distribution. No ordering-free search is done: the guarantee needs the
order fixed before looking at the data.

Even zero errors only give p = (1−δ_tol)^n, so fewer than ⌈log δ / log(1−δ_tol)⌉ tokens
can never certify anything; we refuse (InsufficientCalibrationData) rather than pretend.

Accuracy-drop risk (`ltt_select_accuracy`): per token d_t = 1[full right] − 1[exit right]
∈ {−1, 0, 1}, risk R(λ) = E[d] (the absolute accuracy drop). d is not Bernoulli, and
Hoeffding over a range of 2 is hopeless at ~1 % tolerances, so the p-value comes from the
empirical Bernstein bound (Maurer & Pontil 2009) on x = (d+1)/2 ∈ [0,1] with sample variance
V_n: P(E x ≥ x̄ + sqrt(2 V_n u / n) + 7u / (3(n−1))) ≤ 2e^{−u}; p is 2e^{−u*} for the largest
u* whose bound still lies below the tolerance.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from act_jax.errors import ConfigError

METHODS = ('binomial', 'hoeffding')


class InsufficientCalibrationData(ConfigError):
  """Too few calibration tokens for any threshold to pass the test at this tolerance/risk: a
  user error (more --num_batches, a looser --tolerance or --risk), reported in one line."""


def _check_unit(name: str, value: float) -> float:
  value = float(value)
  if not 0.0 < value < 1.0:
    raise ValueError(f'{name}={value}: must lie strictly between 0 and 1')
  return value


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f'method={method!r}: must be one of {METHODS}')


def binomial_pvalue(n: int, num_errors: int, tolerance: float) -> float:
  """P(Binom(n, tolerance) ≤ num_errors), summed exactly in log space."""
  tolerance = _check_unit('tolerance', tolerance)
  n, k = int(n), int(num_errors)
  if n < 1:
    raise ValueError(f'n={n}: must be a positive number of tokens')
  if k < 0:
    raise ValueError(f'num_errors={k}: must be >= 0')
  if k >= n:
    return 1.0
  j = np.arange(k + 1, dtype=np.float64)
  lgamma = np.frompyfunc(math.lgamma, 1, 1)
  log_pmf = (math.lgamma(n + 1) - lgamma(j + 1).astype(np.float64)
             - lgamma(n - j + 1).astype(np.float64)
             + j * math.log(tolerance) + (n - j) * math.log1p(-tolerance))
  top = float(log_pmf.max())  # log-sum-exp: the terms underflow individually for large n
  return float(min(1.0, math.exp(top) * float(np.exp(log_pmf - top).sum())))


def hoeffding_pvalue(n: int, risk_hat: float, tolerance: float) -> float:
  """exp(−2n (tolerance − risk_hat)_+²): valid for any loss in [0, 1], looser than binomial."""
  tolerance = _check_unit('tolerance', tolerance)
  if int(n) < 1:
    raise ValueError(f'n={n}: must be a positive number of tokens')
  gap = max(tolerance - float(risk_hat), 0.0)
  return float(math.exp(-2.0 * int(n) * gap * gap))


def min_samples(tolerance: float, risk: float, method: str = 'binomial') -> int:
  """Smallest n for which zero errors can still give p ≤ risk.

  binomial: (1 − tolerance)^n ≤ risk;  hoeffding: exp(−2n tolerance²) ≤ risk.
  """
  tolerance = _check_unit('tolerance', tolerance)
  risk = _check_unit('risk', risk)
  _check_method(method)
  if method == 'binomial':
    log_p0 = lambda m: m * math.log1p(-tolerance)
  else:
    log_p0 = lambda m: -2.0 * m * tolerance * tolerance
  per_token = -log_p0(1)
  n = max(1, math.ceil(-math.log(risk) / per_token))
  # The closed form can be off by one in floating point; settle it on the exact test.
  while log_p0(n) > math.log(risk):
    n += 1
  while n > 1 and log_p0(n - 1) <= math.log(risk):
    n -= 1
  return n


def min_samples_accuracy(tolerance: float, risk: float) -> int:
  """Smallest n >= 2 for which a point that changes no prediction (d = 0 on every token)
  passes ltt_select_accuracy's test of E[d] <= tolerance at level risk (the p-value falls
  with n: doubling, then bisection)."""
  tolerance = _check_unit('tolerance', tolerance)
  risk = _check_unit('risk', risk)
  ok = lambda m: bernstein_pvalue(m, 0.0, 0.0, tolerance) <= risk  # noqa: E731
  hi = 2
  while not ok(hi):
    hi *= 2
  lo = max(2, hi // 2)
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
  return hi


def _check_thresholds(thresholds: Any) -> np.ndarray:
  thr = np.asarray(thresholds, np.float64).ravel()
  if thr.size == 0:
    raise ValueError('thresholds is empty: give at least one candidate threshold')
  return thr


def _check_order(thr: np.ndarray) -> None:
  # Exit rule conf >= λ: a larger λ exits less, so conservative -> aggressive is decreasing.
  if np.any(np.diff(thr) >= 0):
    raise ValueError(f'thresholds={thr.tolist()}: must be strictly decreasing '
                     '(conservative -> aggressive) for fixed-sequence testing')


def sweep_thresholds(conf_ZX: Any, pred_ZX: Any, exit_layers_X: Any, thresholds: Any,
                     full_pred_Z: Any = None, correct_ZX: Any = None) -> dict[str, np.ndarray]:
  """Per threshold [K]: 'thresholds', 'mean_layers', 'risk', 'num_errors', ['accuracy'],
  and 'exit_fraction' [K, N] (share of tokens leaving at each exit).

  conf_ZX [Z, X] confidence of each of Z tokens at each of X exits (nan = never exit there);
  pred_ZX [Z, X] predictions; exit_layers_X [X] depth of each exit; full_pred_Z [Z] the
  reference (default pred_ZX[:, -1]); correct_ZX [Z, X] optional 0/1 correctness.
  """
  conf = np.asarray(conf_ZX, np.float64)
  pred = np.asarray(pred_ZX)
  layers = np.asarray(exit_layers_X, np.float64)
  thr = _check_thresholds(thresholds)
  if conf.ndim != 2 or conf.shape[0] < 1 or conf.shape[1] < 1:
    raise ValueError(f'conf_ZX shape {conf.shape}: must be [Z, X] (tokens, exits), both >= 1')
  T, N = conf.shape
  if pred.shape != conf.shape:
    raise ValueError(f'pred_ZX shape {pred.shape} != conf_ZX shape {conf.shape}')
  if layers.shape != (N,):
    raise ValueError(f'exit_layers_X shape {layers.shape}: must be ({N},)')
  full = pred[:, -1] if full_pred_Z is None else np.asarray(full_pred_Z)
  if full.shape != (T,):
    raise ValueError(f'full_pred_Z shape {full.shape}: must be ({T},)')
  # Running max makes "first exit with conf >= λ" = "number of exits whose running max < λ".
  run_max = np.maximum.accumulate(np.where(np.isnan(conf), -np.inf, conf), axis=1)
  exit_idx = np.zeros((thr.size, T), np.int64)
  for n in range(N - 1):  # the last exit is taken regardless, so it is never counted
    exit_idx += run_max[None, :, n] < thr[:, None]
  tok = np.arange(T)[None, :]
  errors = pred[tok, exit_idx] != full[None, :]
  out = {
      'thresholds': thr,
      'mean_layers': layers[exit_idx].mean(1),
      'risk': errors.mean(1),
      'num_errors': errors.sum(1).astype(np.int64),
      'exit_fraction': np.stack([(exit_idx == n).mean(1) for n in range(N)], axis=1),
  }
  if correct_ZX is not None:
    correct = np.asarray(correct_ZX, np.float64)
    if correct.shape != conf.shape:
      raise ValueError(f'correct_ZX shape {correct.shape} != conf_ZX shape {conf.shape}')
    out['accuracy'] = correct[tok, exit_idx].mean(1)
  return out


def _pvalues(num_errors: np.ndarray, n: int, tolerance: float, method: str) -> np.ndarray:
  if method == 'binomial':
    return np.array([binomial_pvalue(n, k, tolerance) for k in num_errors])
  return np.array([hoeffding_pvalue(n, k / n, tolerance) for k in num_errors])


def _fixed_sequence(pvalues: np.ndarray, risk_level: float) -> np.ndarray:
  """valid[i] iff p_1..p_i are all <= risk_level: stop at the first failure."""
  return np.cumprod(pvalues <= risk_level).astype(bool)


def ltt_select(thresholds: Any, risks: Any, n: int, tolerance: float, risk_level: float,
               method: str = 'binomial', *, num_errors: Any = None) -> dict[str, Any]:
  """Learn-then-Test with fixed-sequence testing over thresholds (conservative first).

  Give the empirical `risks` (fractions) or, exactly, `num_errors` (then risks=None).
  Returns {'index', 'threshold', 'pvalues', 'valid'}; index/threshold are None when no
  threshold is certified (use full depth). Raises InsufficientCalibrationData when n is
  below min_samples(tolerance, risk_level, method).
  """
  thr = _check_thresholds(thresholds)
  _check_order(thr)
  tolerance = _check_unit('tolerance', tolerance)
  risk_level = _check_unit('risk_level', risk_level)
  _check_method(method)
  n = int(n)
  needed = min_samples(tolerance, risk_level, method)
  if n < needed:
    raise InsufficientCalibrationData(
        f'{method} Learn-then-Test at tolerance={tolerance}, risk_level={risk_level} needs '
        f'at least {needed} calibration tokens, but n={n} were given')
  if (risks is None) == (num_errors is None):
    raise ValueError('give exactly one of risks and num_errors')
  if num_errors is None:
    # Counts are integers; rounding undoes the float division that produced the risks.
    errs = np.rint(np.asarray(risks, np.float64).ravel() * n).astype(np.int64)
  else:
    errs = np.asarray(num_errors).ravel().astype(np.int64)
  if errs.shape != thr.shape:
    raise ValueError(f'{errs.size} risks/num_errors for {thr.size} thresholds')
  if np.any(errs < 0) or np.any(errs > n):
    raise ValueError(f'risks/num_errors must lie in [0, n={n}] errors')
  pvalues = _pvalues(errs, n, tolerance, method)
  valid = _fixed_sequence(pvalues, risk_level)
  index = int(np.flatnonzero(valid)[-1]) if valid.any() else None
  return {'index': index, 'threshold': None if index is None else float(thr[index]),
          'pvalues': pvalues, 'valid': valid}


def bernstein_pvalue(n: int, mean: float, second_moment: float, tolerance: float,
                     lo: float = -1.0, hi: float = 1.0) -> float:
  """p-value of H: "E[x] > tolerance" for n samples in [lo, hi] with the given sample mean
  and mean of squares, from the empirical Bernstein bound (see the module docstring)."""
  n = int(n)
  if n < 2:
    raise ValueError(f'n={n}: need at least 2 samples')
  width = float(hi - lo)
  m = (float(mean) - lo) / width
  var = max(float(second_moment) - float(mean) ** 2, 0.0) / width ** 2 * n / (n - 1)
  c = (float(tolerance) - lo) / width - m
  if c <= 0:
    return 1.0
  a, b = 7.0 / (3.0 * (n - 1)), math.sqrt(2.0 * var / n)
  s = (-b + math.sqrt(b * b + 4.0 * a * c)) / (2.0 * a)  # root of a·s² + b·s = c, s = √u
  return min(1.0, 2.0 * math.exp(-s * s))


def ltt_select_accuracy(thresholds: Any, n: int, broken: Any, fixed: Any, tolerance: float,
                        risk_level: float) -> dict[str, Any]:
  """Learn-then-Test on the absolute accuracy drop E[d] <= tolerance (module docstring).

  broken[i] / fixed[i]: calibration tokens that threshold i makes wrong / right against the
  full model (d = +1 / −1). Returns ltt_select's dict. Raises InsufficientCalibrationData when
  even a threshold that changes nothing could not be certified with n tokens.
  """
  thr = _check_thresholds(thresholds)
  _check_order(thr)
  tolerance = _check_unit('tolerance', tolerance)
  risk_level = _check_unit('risk_level', risk_level)
  n = int(n)
  b = np.asarray(broken, np.int64).ravel()
  f = np.asarray(fixed, np.int64).ravel()
  if b.shape != thr.shape or f.shape != thr.shape:
    raise ValueError(f'{b.size} broken / {f.size} fixed counts for {thr.size} thresholds')
  if np.any(b < 0) or np.any(f < 0) or np.any(b + f > n):
    raise ValueError(f'broken and fixed counts must be >= 0 and sum to at most n={n}')
  if n < min_samples_accuracy(tolerance, risk_level):
    raise InsufficientCalibrationData(
        f'accuracy-drop Learn-then-Test at tolerance={tolerance}, risk_level={risk_level}: '
        f'n={n} calibration tokens cannot certify even an exit that changes no prediction')
  pvalues = np.array([bernstein_pvalue(n, (bi - fi) / n, (bi + fi) / n, tolerance)
                      for bi, fi in zip(b, f)])
  valid = _fixed_sequence(pvalues, risk_level)
  index = int(np.flatnonzero(valid)[-1]) if valid.any() else None
  return {'index': index, 'threshold': None if index is None else float(thr[index]),
          'pvalues': pvalues, 'valid': valid}


def select_in_order(measure: str, n: int, num_errors: Any, broken: Any, fixed: Any,
                    full_correct: int, tolerance: float, risk_level: float) -> dict[str, Any]:
  """Fixed-sequence Learn-then-Test of K points in the given order (most accurate first) from
  their summed counts over n tokens: 'consistency' bounds num_errors / n by tolerance
  (binomial); 'accuracy' bounds the drop (broken - fixed) / n by tolerance x the full-depth
  accuracy full_correct / n (empirical Bernstein), as calibrate does. Returns ltt_select's
  dict; raises InsufficientCalibrationData when n cannot certify anything."""
  k = np.asarray(num_errors).size
  order = np.arange(k, 0, -1, dtype=np.float64)  # stand-in thresholds: test in this order
  if measure == 'consistency':
    return ltt_select(order, None, n, tolerance, risk_level, 'binomial',
                      num_errors=num_errors)
  if measure != 'accuracy':
    raise ValueError(f'measure={measure!r}: must be consistency or accuracy')
  if full_correct <= 0:
    raise InsufficientCalibrationData('no token is right at full depth: a relative accuracy '
                                      'drop is undefined')
  return ltt_select_accuracy(order, n, broken, fixed, tolerance * full_correct / n,
                             risk_level)


def budget_select(thresholds: Any, mean_layers: Any, budget_layers: float) -> float | None:
  """The most conservative (largest) threshold whose mean_layers <= budget; None if none.

  No risk guarantee: this answers "how good can we be at this compute budget?".
  """
  thr = _check_thresholds(thresholds)
  ml = np.asarray(mean_layers, np.float64).ravel()
  if ml.shape != thr.shape:
    raise ValueError(f'{ml.size} mean_layers for {thr.size} thresholds')
  ok = ml <= float(budget_layers)
  return float(thr[ok].max()) if ok.any() else None


def _jsonable(x: Any) -> Any:
  """numpy -> lists/floats; nan/inf -> None so json.dumps(allow_nan=False) works."""
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer, int)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(x) else None
  return x


def _operating_point(sweep: dict, index: int | None, full_depth: dict) -> dict[str, Any]:
  point = full_depth if index is None else {
      k: sweep[k][index] for k in ('mean_layers', 'risk', 'num_errors', 'accuracy')
      if k in sweep}
  point = {'accuracy': None, **point}
  point['consistency'] = 1.0 - float(point['risk'])
  return point


def calibrate(conf_ZX: Any, pred_ZX: Any, exit_layers_X: Any, thresholds: Sequence[float],
              tolerance: float, risk_level: float, calib_fraction: float = 0.5,
              seed: int = 0, method: str = 'binomial', budget_layers: float | None = None,
              correct_ZX: Any = None, full_pred_Z: Any = None) -> dict[str, Any]:
  """Split tokens, select a threshold on the calibration part, report on the test part.

  Tokens are split by np.random.default_rng(seed).permutation(T): the first
  round(calib_fraction·T) are calibration, the rest test. Selection is Learn-then-Test
  (certified: risk ≤ tolerance w.p. ≥ 1 − risk_level) unless budget_layers is given, in
  which case budget_select picks the threshold and 'certified' says whether LTT would also
  have accepted it. With no selected threshold the operating point is full depth.
  Thresholds must run conservative -> aggressive (strictly decreasing). The result is
  JSON-serialisable: 'test' and 'calib' operating points and per-threshold 'frontier'.
  """
  thr = _check_thresholds(thresholds)
  _check_order(thr)
  tolerance = _check_unit('tolerance', tolerance)
  risk_level = _check_unit('risk_level', risk_level)
  calib_fraction = _check_unit('calib_fraction', calib_fraction)
  _check_method(method)
  conf = np.asarray(conf_ZX, np.float64)
  pred = np.asarray(pred_ZX)
  if conf.ndim != 2 or pred.shape != conf.shape:
    raise ValueError(f'conf_ZX {conf.shape} and pred_ZX {pred.shape} must both be [Z, X] (tokens, exits)')
  T = conf.shape[0]
  n_cal = int(round(calib_fraction * T))
  if not 0 < n_cal < T:
    raise ValueError(f'calib_fraction={calib_fraction} with T={T} tokens leaves an empty split')
  perm = np.random.default_rng(seed).permutation(T)
  parts = {'calib': perm[:n_cal], 'test': perm[n_cal:]}
  full = pred[:, -1] if full_pred_Z is None else np.asarray(full_pred_Z)
  if full.shape != (T,):
    raise ValueError(f'full_pred_Z shape {full.shape}: must be ({T},)')
  layers = np.asarray(exit_layers_X, np.float64)
  sweeps, full_depth = {}, {}
  for name, idx in parts.items():
    correct = None if correct_ZX is None else np.asarray(correct_ZX, np.float64)[idx]
    sweeps[name] = sweep_thresholds(conf[idx], pred[idx], layers, thr, full[idx], correct)
    # The fallback when nothing is selected: every token runs to the last exit.
    wrong = pred[idx, -1] != full[idx]
    full_depth[name] = {'mean_layers': float(layers[-1]), 'risk': float(wrong.mean()),
                        'num_errors': int(wrong.sum())}
    if correct is not None:
      full_depth[name]['accuracy'] = float(correct[:, -1].mean())
  cal = sweeps['calib']
  if budget_layers is None:
    sel = ltt_select(thr, None, n_cal, tolerance, risk_level, method,
                     num_errors=cal['num_errors'])
    index, pvalues, valid = sel['index'], sel['pvalues'], sel['valid']
    certified = index is not None
  else:
    chosen = budget_select(thr, cal['mean_layers'], budget_layers)
    index = None if chosen is None else int(np.flatnonzero(thr == chosen)[0])
    pvalues = _pvalues(cal['num_errors'], n_cal, tolerance, method)
    valid = _fixed_sequence(pvalues, risk_level)
    enough = n_cal >= min_samples(tolerance, risk_level, method)
    certified = bool(index is not None and enough and valid[index])
  result = {
      'mode': 'ltt' if budget_layers is None else 'budget',
      'method': method, 'index': index,
      'threshold': None if index is None else float(thr[index]),
      'certified': certified, 'tolerance': tolerance, 'risk_level': risk_level,
      'budget_layers': budget_layers, 'seed': seed, 'n_calib': n_cal, 'n_test': T - n_cal,
      'full_layers': float(layers[-1]),
      'test': _operating_point(sweeps['test'], index, full_depth['test']),
      'calib': _operating_point(cal, index, full_depth['calib']),
      'frontier': {'thresholds': thr, 'pvalues': pvalues, 'valid': valid,
                   **{name: {k: v for k, v in s.items() if k != 'thresholds'}
                      for name, s in sweeps.items()}},
  }
  return _jsonable(result)
