"""calibrate / generate / benchmark on a tiny trained run, and their bad inputs.

Each test works on its own copy of the suite's shared trained run 'lm' (calibrate writes
into it); test_train_and_certify resumes its copy (nothing left to train) and certifies."""
import json
import os

import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax.bench import decode as decode_bench
from act_jax.calibrate import certify, frontier
from act_jax.calibrate import ltt as calibration, operating_point
from act_jax.errors import CheckpointError, ConfigError
from act_jax.infer import inference
from act_jax.run import directory as run_lib
from act_jax.viz import listing


@pytest.fixture
def run(shared_runs, tmp_path):
  """A copy of the shared 'lm' run: confidence exits, 4 layers, top-k MoE, 10 steps."""
  return shared_runs.copy('lm', str(tmp_path / 'run'))


def test_calibrate_writes_frontier_and_plot(run):
  r = certify.calibrate_run(run, tolerance=0.2, risk=0.1, num_batches=8,
                            log=lambda s: None)
  saved = json.load(open(os.path.join(run, 'calibration.json')))
  assert saved['chosen_threshold'] == r['chosen_threshold']
  fr = saved['frontier']
  assert len(fr['thresholds']) == len(fr['mean_layers']) == len(fr['ms_per_token'])
  assert all(1.0 <= m <= 4.0 for m in fr['mean_layers'])
  # Thresholds go conservative -> aggressive: layers never increase along the frontier.
  assert np.all(np.diff(fr['mean_layers']) <= 1e-9)
  with open(os.path.join(run, 'calibration.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # Static-truncation baseline: 2 steps of [dense, moe]; the last exit IS full depth.
  assert saved['static']['layers'] == [2, 4]
  assert saved['static']['accuracy'][-1] == pytest.approx(saved['full_depth']['accuracy'])


def test_static_baseline_matches_the_exit_heads(run):
  config, state, _ = run_lib.load(run)
  v = {'params': state['params'], 'moe_state': state['moe_state']}
  from act_jax import data as data_lib
  from act_jax.model.transformer import make_model
  batches = data_lib.make_dataset(config.data, config.seed).eval_batches(2)
  out = operating_point.sweep(config, v, batches, [0.5])
  correct = n = 0
  for b in batches:  # step 0's exit head applied to every token, by the masked scan
    aux = make_model(config_lib.resolve(config)).apply(v, b['inputs'], threshold=inference.NEVER_EXIT)[1]
    m = b['weights'] > 0
    correct += ((np.asarray(aux['step_logits'][0]).argmax(-1) == b['targets']) & m).sum()
    n += m.sum()
  assert out['static']['accuracy'][0] == pytest.approx(correct / n)


def test_budget_mode_meets_the_budget(run):
  r = certify.calibrate_run(run, budget_layers=2.0, num_batches=4, log=lambda s: None)
  if r['chosen_threshold'] is not None:
    assert r['calib']['mean_layers'] <= 2.0


def test_too_little_calibration_data_is_refused(run):
  with pytest.raises(calibration.InsufficientCalibrationData):
    certify.calibrate_run(run, tolerance=0.001, risk=0.01, num_batches=2,
                          log=lambda s: None)


def test_generate_listing_and_bad_inputs(run):
  out = listing.generate_listing(run, 'def f(', 0.5, max_new=8)
  assert 'layers ' in out and 'tokens/s' in out
  with pytest.raises(ConfigError, match='threshold'):
    listing.generate_listing(run, 'x', 1.5)
  with pytest.raises(ConfigError, match='prompt'):
    listing.generate_listing(run, 'x' * 100, 0.5)


def test_policies_without_exits_are_refused(shared_runs, tmp_path):
  run = shared_runs.copy('policy_mod', str(tmp_path / 'mod'))
  with pytest.raises(ConfigError, match='no inference-time exit'):
    certify.calibrate_run(run, log=lambda s: None)


def test_missing_and_mismatched_checkpoints(run, tmp_path):
  with pytest.raises(CheckpointError, match='does not exist'):
    certify.calibrate_run(str(tmp_path / 'nope'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(CheckpointError, match='config.json'):
    run_lib.load(str(tmp_path / 'empty'))
  # A config.json of another model next to this checkpoint: named mismatch, not garbage.
  import shutil
  other = tmp_path / 'other'
  shutil.copytree(run, other)
  cfg = json.load(open(other / 'config.json'))
  cfg['model']['d_model'] = 48
  json.dump(cfg, open(other / 'config.json', 'w'))
  with pytest.raises(CheckpointError, match='incompatible checkpoint'):
    run_lib.load(str(other))


def test_benchmark_table(run):
  rows = decode_bench.benchmark_rows(run, [0.5], batch_sizes=[1, 2], new_tokens=4,
                                     repeats=1, log=lambda s: None)
  assert {(r['batch'], r['compact']) for r in rows} == {(1, False), (2, False), (2, True)}
  table = decode_bench.format_table(rows)
  assert 'speedup' in table and all(r['ms_per_token'] > 0 for r in rows)


def test_evaluate_run_reports_each_threshold(run):
  rows = operating_point.evaluate_run(run, [None, 0.5], num_batches=2, log=lambda s: None)
  # None: the run's operating point (the policy default: this copy has no calibration.json)
  want, _ = operating_point.run_operating_point(run, run_lib.read_config(run))
  assert [(r['threshold'], r['max_layers']) for r in rows] == [
      (want.threshold, want.max_layers), (0.5, None)]
  assert all('code/layers_mean' in r and 1.0 <= r['layers_mean'] <= 4.0 for r in rows)


def test_accuracy_frontier_picks_on_one_half_reports_on_the_other(run):
  thresholds, tol = [0.99, 0.5, 0.05], 0.3
  res = frontier.accuracy_frontier(run, thresholds, [None, 2], tolerance=tol,
                                   num_batches=4, log=lambda s: None)
  assert [r['max_layers'] for r in res['rows']] == [4, 2]
  config, state, _ = run_lib.load(run)
  v = {'params': state['params'], 'moe_state': state['moe_state']}
  from act_jax import data as data_lib
  batches = data_lib.make_dataset(config.data, config.seed).eval_batches(4)
  for row, cap in zip(res['rows'], (None, 2)):
    cal = operating_point.sweep(config, v, batches[0::2], thresholds, max_layers=cap)
    drops = [(cal['full_accuracy'] - a) / cal['full_accuracy'] for a in cal['accuracy']]
    ok = [i for i, d in enumerate(drops) if d <= tol]
    if not ok:
      assert row['threshold'] is None
      continue
    want = min(ok, key=lambda i: cal['mean_layers'][i])  # picked on the calibration half
    assert row['threshold'] == thresholds[want]
    tst = operating_point.sweep(config, v, batches[1::2], [thresholds[want]], max_layers=cap)
    assert row['accuracy'] == pytest.approx(tst['accuracy'][0])  # reported on the test half
    assert row['mean_layers'] == pytest.approx(tst['mean_layers'][0])
    assert row['mean_layers'] <= (cap or 4)
    assert row['fewer_layers'] == pytest.approx(4 / row['mean_layers'])
  st = res['static']
  fits = [k for k, a in zip(st['layers'], st['accuracy'])
          if (res['full_accuracy'] - a) / res['full_accuracy'] <= tol]
  assert (res['static_best'] or {}).get('layers') == (fits[0] if fits else None)
  assert 'static truncation' in frontier.format_frontier(res)
  with pytest.raises(ConfigError, match='max_layers'):
    frontier.accuracy_frontier(run, [0.5], [3], num_batches=4)


def test_calibrate_on_an_accuracy_tolerance(run):
  r = certify.calibrate_run(run, tolerance=0.5, risk=0.2, num_batches=8,
                            measure='accuracy', log=lambda s: None)
  assert r['measure'] == 'accuracy' and r['method'] == 'bernstein'
  p = np.asarray(r['frontier']['pvalues'])
  assert p.shape == (len(r['frontier']['thresholds']),)
  k = 0 if r['chosen_threshold'] is None else \
      r['frontier']['thresholds'].index(r['chosen_threshold']) + 1
  assert np.all(p[:k] <= 0.2) and (k == len(p) or p[k] > 0.2)  # fixed-sequence testing
  with pytest.raises(ConfigError, match='measure'):
    certify.calibrate_run(run, measure='loss', num_batches=4, log=lambda s: None)
  with pytest.raises(calibration.InsufficientCalibrationData):
    certify.calibrate_run(run, tolerance=0.001, measure='accuracy', num_batches=2,
                          log=lambda s: None)


def test_train_and_certify_ends_at_a_certified_point(run):
  """What experiments.train does when config.train.certify_tolerance > 0 (lm.py's default):
  train_and_evaluate, then certify. Here on a copy of the trained shared run with its own
  config: training resumes at its last step (nothing left to train), evaluates, certifies."""
  c = config_lib.complete(json.load(open(os.path.join(run, 'config.json'))))
  c.train.certify_tolerance = 0.5
  lines = []
  res = certify.train_and_certify(c, run, log=lines.append, num_batches=8)
  text = '\n'.join(lines)
  assert 'resumed from step 10' in text
  assert '== certified operating point (<= 50.0% relative accuracy drop' in text
  saved = json.load(open(os.path.join(run, 'calibration.json')))
  assert saved['measure'] == 'accuracy' and saved['tolerance'] == 0.5
  assert saved['chosen_threshold'] is not None  # a 50 % tolerance certifies something
  assert res['certified/threshold'] == saved['chosen_threshold']
  # two paths, one answer: the masked-scan evaluation of the summary and calibrate's
  # real-skip sweep agree on the test half's layers and accuracy at the certified point
  assert res['certified/layers_mean'] == pytest.approx(saved['test']['mean_layers'], abs=1e-6)
  assert res['certified/accuracy'] == pytest.approx(saved['test']['accuracy'], abs=1e-6)
  assert res['certified/full_accuracy'] == pytest.approx(saved['full_depth']['accuracy'],
                                                         abs=1e-6)
  assert f'{4 / res["certified/layers_mean"]:.2f}x fewer than full depth' in text
  for d in ('code', 'prose'):
    assert f'{d}: ' in text and 1.0 <= res[f'certified/{d}/layers_mean'] <= 4.0
  # every binary now serves at that point
  op, source = operating_point.run_operating_point(run, run_lib.read_config(run))
  assert op.threshold == saved['chosen_threshold'] and source.endswith('calibration.json')
