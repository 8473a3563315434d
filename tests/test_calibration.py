"""Known-answer tests for act_jax.calibrate.ltt (Learn-then-Test early-exit calibration)."""
import json
import math

import numpy as np
import pytest

from act_jax.calibrate import ltt as cal


def test_binomial_pvalue_matches_scipy():
  stats = pytest.importorskip('scipy.stats')
  for n, k, tol in [(10, 3, 0.3), (20000, 100, 0.01), (20000, 180, 0.01), (500, 0, 0.01),
                    (1000, 120, 0.1), (7, 6, 0.5)]:
    assert cal.binomial_pvalue(n, k, tol) == pytest.approx(stats.binom.cdf(k, n, tol),
                                                           rel=1e-9, abs=1e-300)
  assert cal.binomial_pvalue(10, 10, 0.2) == 1.0
  assert cal.binomial_pvalue(299, 0, 0.01) == pytest.approx(0.99 ** 299)


def test_hoeffding_pvalue_hand_value():
  # exp(-2 * 20000 * (0.01 - 0.005)^2) = exp(-1)
  assert cal.hoeffding_pvalue(20000, 0.005, 0.01) == pytest.approx(math.exp(-1))
  assert cal.hoeffding_pvalue(100, 0.2, 0.1) == 1.0  # empirical risk above tolerance


def test_min_samples():
  # (0.99)^298 = 0.0500... > 0.05, (0.99)^299 = 0.0495 <= 0.05
  assert cal.min_samples(0.01, 0.05) == 299
  assert 0.99 ** 298 > 0.05 >= 0.99 ** 299
  # hoeffding: n >= log(20) / (2 * 1e-4) = 14978.66
  assert cal.min_samples(0.01, 0.05, method='hoeffding') == 14979
  assert cal.min_samples(0.5, 0.5) == 1


def _known_risk_scores():
  """20000 tokens, 2 exits (layers 4, 12); risks 0, 0.5%, 2%, 10% at 0.9, 0.8, 0.7, 0.6.

  group conf  tokens wrong-at-exit0
  A     0.95  4000   0
  B     0.85  2000   100   -> cumulative 100 / 20000 = 0.005
  C     0.75  2000   300   -> 400 / 20000 = 0.02
  D     0.65  4000   1600  -> 2000 / 20000 = 0.10
  E     0.50  8000   (always reach exit 1)
  """
  groups = [(0.95, 4000, 0), (0.85, 2000, 100), (0.75, 2000, 300), (0.65, 4000, 1600),
            (0.50, 8000, 0)]
  conf, pred0 = [], []
  for c, size, wrong in groups:
    conf += [c] * size
    pred0 += [1] * wrong + [0] * (size - wrong)
  T = len(conf)
  conf_ZX = np.stack([np.array(conf), np.full(T, 0.99)], axis=1)
  pred_ZX = np.stack([np.array(pred0), np.zeros(T, int)], axis=1)
  return conf_ZX, pred_ZX, np.array([4, 12])


THRESHOLDS = [0.9, 0.8, 0.7, 0.6]


def test_sweep_and_ltt_pick_known_threshold():
  conf_ZX, pred_ZX, layers = _known_risk_scores()
  sweep = cal.sweep_thresholds(conf_ZX, pred_ZX, layers, THRESHOLDS)
  np.testing.assert_allclose(sweep['risk'], [0.0, 0.005, 0.02, 0.10])
  np.testing.assert_array_equal(sweep['num_errors'], [0, 100, 400, 2000])
  # λ=0.9: 4000 tokens at layer 4, 16000 at 12 -> 10.4; λ=0.8: 6000 at 4 -> 9.6
  np.testing.assert_allclose(sweep['mean_layers'], [10.4, 9.6, 8.8, 7.2])
  sel = cal.ltt_select(THRESHOLDS, sweep['risk'], 20000, tolerance=0.01, risk_level=0.05)
  assert sel['index'] == 1 and sel['threshold'] == 0.8
  np.testing.assert_array_equal(sel['valid'], [True, True, False, False])
  same = cal.ltt_select(THRESHOLDS, None, 20000, 0.01, 0.05, num_errors=sweep['num_errors'])
  assert same['index'] == 1
  np.testing.assert_allclose(same['pvalues'], sel['pvalues'])
  # Hoeffding is looser: 0.5% at n=20000 gives p = exp(-1) > 0.05 -> only 0.9 survives.
  hoeff = cal.ltt_select(THRESHOLDS, sweep['risk'], 20000, 0.01, 0.05, method='hoeffding')
  assert hoeff['threshold'] == 0.9
  assert hoeff['pvalues'][1] == pytest.approx(math.exp(-1))


def test_fixed_sequence_stops_at_first_failure():
  # The third threshold would pass on its own, but testing stops at the second.
  sel = cal.ltt_select([0.9, 0.8, 0.7, 0.6], [0.0, 0.02, 0.0, 0.0], 20000, 0.01, 0.05)
  assert sel['index'] == 0 and sel['threshold'] == 0.9
  np.testing.assert_array_equal(sel['valid'], [True, False, False, False])
  assert sel['pvalues'][2] <= 0.05
  none = cal.ltt_select([0.9, 0.8], [0.05, 0.0], 20000, 0.01, 0.05)
  assert none['index'] is None and none['threshold'] is None
  assert not none['valid'].any()


def test_ltt_refuses_small_n_and_bad_input():
  with pytest.raises(cal.InsufficientCalibrationData, match=r'299.*n=50'):
    cal.ltt_select([0.9, 0.8], [0.0, 0.0], 50, tolerance=0.01, risk_level=0.05)
  with pytest.raises(ValueError, match='decreasing'):
    cal.ltt_select([0.6, 0.7, 0.8], [0.0, 0.0, 0.0], 20000, 0.01, 0.05)
  with pytest.raises(ValueError, match='tolerance'):
    cal.ltt_select([0.9], [0.0], 20000, 1.5, 0.05)
  with pytest.raises(ValueError, match='risk_level'):
    cal.ltt_select([0.9], [0.0], 20000, 0.01, 0.0)
  with pytest.raises(ValueError, match='thresholds'):
    cal.ltt_select([], [], 20000, 0.01, 0.05)


def test_budget_select():
  thr = [0.9, 0.8, 0.7, 0.6]
  ml = [10.4, 9.6, 8.8, 7.2]
  assert cal.budget_select(thr, ml, 9.0) == 0.7   # most conservative within budget
  assert cal.budget_select(thr, ml, 9.6) == 0.8   # equality counts as within budget
  assert cal.budget_select(thr, ml, 12.0) == 0.9
  assert cal.budget_select(thr, ml, 5.0) is None


def test_sweep_thresholds_three_token_hand_example():
  conf = np.array([[0.95, 0.50, 0.99],
                   [0.20, 0.85, 0.90],
                   [0.10, np.nan, 0.40]])
  pred = np.array([[1, 2, 3],
                   [4, 5, 6],
                   [7, 8, 9]])
  correct = np.array([[0, 1, 1],
                      [0, 0, 1],
                      [1, 1, 1]])
  layers = [2, 4, 6]
  s = cal.sweep_thresholds(conf, pred, layers, [0.9, 0.8, 0.05], correct_ZX=correct)
  # λ=0.9: exits (0, 2, 2) -> layers 2, 6, 6; wrong: token 0 only.
  # λ=0.8: exits (0, 1, 2) -> layers 2, 4, 6; wrong: tokens 0, 1.
  # λ=0.05: exits (0, 0, 0) -> layers 2, 2, 2; all wrong.
  np.testing.assert_allclose(s['mean_layers'], [14 / 3, 4.0, 2.0])
  np.testing.assert_allclose(s['risk'], [1 / 3, 2 / 3, 1.0])
  np.testing.assert_array_equal(s['num_errors'], [1, 2, 3])
  np.testing.assert_allclose(s['accuracy'], [2 / 3, 1 / 3, 1 / 3])
  np.testing.assert_allclose(s['exit_fraction'],
                             [[1 / 3, 0, 2 / 3], [1 / 3, 1 / 3, 1 / 3], [1, 0, 0]])
  # An explicit reference (e.g. gold labels) instead of the last exit.
  s2 = cal.sweep_thresholds(conf, pred, layers, [0.9], full_pred_Z=[1, 6, 0])
  np.testing.assert_allclose(s2['risk'], [1 / 3])
  with pytest.raises(ValueError, match='exit_layers_X'):
    cal.sweep_thresholds(conf, pred, [2, 4], [0.9])


def test_calibrate_reports_on_test_split_and_is_json():
  conf_ZX, pred_ZX, layers = _known_risk_scores()
  conf_ZX = np.concatenate([conf_ZX, conf_ZX])  # 40000 tokens -> 20000 per split
  pred_ZX = np.concatenate([pred_ZX, pred_ZX])
  correct = (pred_ZX == 0).astype(float)
  out = cal.calibrate(conf_ZX, pred_ZX, layers, THRESHOLDS, tolerance=0.01, risk_level=0.05,
                      seed=3, correct_ZX=correct)
  json.dumps(out, allow_nan=False)
  assert out['threshold'] == 0.8 and out['certified'] and out['mode'] == 'ltt'
  assert out['n_calib'] == out['n_test'] == 20000
  # Recompute the test split independently.
  test_idx = np.random.default_rng(3).permutation(40000)[20000:]
  ref = cal.sweep_thresholds(conf_ZX[test_idx], pred_ZX[test_idx], layers, [0.8],
                             correct_ZX=correct[test_idx])
  assert out['test']['risk'] == pytest.approx(ref['risk'][0])
  assert out['test']['mean_layers'] == pytest.approx(ref['mean_layers'][0])
  assert out['test']['accuracy'] == pytest.approx(ref['accuracy'][0])
  assert out['test']['consistency'] == pytest.approx(1 - ref['risk'][0])
  assert out['test']['risk'] < 0.01
  assert out['test']['risk'] != out['calib']['risk']  # the two halves differ
  assert len(out['frontier']['test']['risk']) == 4 and len(out['frontier']['valid']) == 4


def test_calibrate_budget_and_full_depth_fallback():
  conf_ZX, pred_ZX, layers = _known_risk_scores()
  out = cal.calibrate(conf_ZX, pred_ZX, layers, THRESHOLDS, 0.01, 0.05,
                      budget_layers=8.0, method='binomial')
  # Only λ=0.6 (about 7.2 layers) fits a budget of 8; its risk (10%) is not certified.
  assert out['mode'] == 'budget' and out['threshold'] == 0.6 and not out['certified']
  assert out['test']['mean_layers'] < 8.0
  # Every early exit now disagrees at the most conservative threshold -> full depth.
  worse = pred_ZX.copy()
  worse[:, 0] = 1 - worse[:, 0]  # every early exit now disagrees with the full model
  fb = cal.calibrate(conf_ZX, worse, layers, THRESHOLDS, 0.01, 0.05)
  assert fb['threshold'] is None and fb['index'] is None and not fb['certified']
  assert fb['test'] == {'accuracy': None, 'mean_layers': 12.0, 'risk': 0.0,
                        'num_errors': 0, 'consistency': 1.0}
  json.dumps(fb, allow_nan=False)


def test_calibrate_bad_input():
  conf_ZX, pred_ZX, layers = _known_risk_scores()
  with pytest.raises(ValueError, match='tolerance'):
    cal.calibrate(conf_ZX, pred_ZX, layers, THRESHOLDS, 0.0, 0.05)
  with pytest.raises(ValueError, match='risk_level'):
    cal.calibrate(conf_ZX, pred_ZX, layers, THRESHOLDS, 0.01, 1.0)
  with pytest.raises(ValueError, match='thresholds'):
    cal.calibrate(conf_ZX, pred_ZX, layers, [], 0.01, 0.05)
  with pytest.raises(cal.InsufficientCalibrationData):
    cal.calibrate(conf_ZX[:100], pred_ZX[:100], layers, THRESHOLDS, 0.01, 0.05)


# ---------------------------------------------------------------- accuracy-drop risk

def test_bernstein_pvalue_known_answers():
  from act_jax.calibrate.ltt import bernstein_pvalue
  # no change at all (d = 0 everywhere): x = 1/2, V = 0 -> p = 2 exp(-3 (n-1) tol / 14)
  n, tol = 1000, 0.02
  assert bernstein_pvalue(n, 0.0, 0.0, tol) == pytest.approx(2 * math.exp(-3 * 999 * tol / 14))
  assert bernstein_pvalue(n, 0.03, 0.05, tol) == 1.0   # observed drop above the tolerance
  # by hand for mean 0.001, E[d^2] 0.003 (n = 20000, tol = 0.01)
  n, m, q = 20000, 0.001, 0.003
  var = (q - m * m) / 4 * n / (n - 1)
  a, b, c = 7 / (3 * (n - 1)), math.sqrt(2 * var / n), (0.01 - m) / 2
  s = (-b + math.sqrt(b * b + 4 * a * c)) / (2 * a)
  assert bernstein_pvalue(n, m, q, 0.01) == pytest.approx(2 * math.exp(-s * s))
  # more spread, or a mean closer to the tolerance, is less evidence
  assert bernstein_pvalue(n, m, 0.03, 0.01) > bernstein_pvalue(n, m, q, 0.01)
  assert bernstein_pvalue(n, 0.005, q, 0.01) > bernstein_pvalue(n, m, q, 0.01)


def test_bernstein_pvalue_is_valid_at_the_boundary():
  """True drop exactly at the tolerance: P(p <= delta) <= delta (it is conservative)."""
  from act_jax.calibrate.ltt import bernstein_pvalue
  rng = np.random.default_rng(0)
  tol, n = 0.02, 400
  probs = [0.06 + tol, 0.06, 1 - 0.12 - tol]  # P(d=+1), P(d=-1), P(d=0): E[d] = tol
  p = []
  for _ in range(2000):
    d = rng.choice([1, -1, 0], size=n, p=probs)
    p.append(bernstein_pvalue(n, d.mean(), (d * d).mean(), tol))
  p = np.asarray(p)
  for delta in (0.05, 0.1, 0.3):
    assert (p <= delta).mean() <= delta
  # and it has power when the drop is well below the tolerance
  d = rng.choice([1, -1, 0], size=20000, p=[0.03, 0.03, 0.94])
  assert bernstein_pvalue(20000, d.mean(), (d * d).mean(), tol) < 1e-3


def test_ltt_select_accuracy_picks_the_last_certified_threshold():
  from act_jax.calibrate.ltt import bernstein_pvalue, ltt_select_accuracy
  thr, n = [0.99, 0.9, 0.8, 0.7], 20000
  broken, fixed = [0, 40, 200, 600], [0, 20, 40, 100]  # drops 0, 0.1 %, 0.8 %, 2.5 %
  sel = ltt_select_accuracy(thr, n, broken, fixed, 0.01, 0.05)
  assert sel['threshold'] == 0.9 and sel['index'] == 1
  assert sel['pvalues'][2] == pytest.approx(bernstein_pvalue(n, 160 / n, 240 / n, 0.01))
  assert sel['pvalues'][2] > 0.05  # 0.8 % observed is too close to 1 % for 20 k tokens
  assert list(sel['valid']) == [True, True, False, False]
  with pytest.raises(cal.InsufficientCalibrationData, match='cannot certify'):
    ltt_select_accuracy(thr, 100, [0] * 4, [0] * 4, 0.01, 0.05)
  with pytest.raises(ValueError, match='broken and fixed'):
    ltt_select_accuracy(thr, 10, [5, 6, 0, 0], [6, 5, 0, 0], 0.01, 0.05)
