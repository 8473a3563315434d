"""Report / compare: every plot on synthetic inputs, make_report and compare on a real tiny
MoE run, the clear no-metrics error, and known answers for the telemetry helpers they use."""
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from act_jax import data, telemetry
from act_jax.viz import compare, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def assert_png(path):
  with open(path, 'rb') as f:
    head = f.read(8)
  assert head == PNG_SIGNATURE, path
  assert os.path.getsize(path) > 1024, path
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


CALIBRATION = {'policy': 'confidence', 'full_layers': 4.0, 'chosen_threshold': 0.7,
               'tolerance': 0.05, 'risk': 0.1,
               'frontier': {'thresholds': [0.9, 0.7, 0.5, 0.3], 'mean_layers': [3.9, 3.2, 2.5, 1.8],
                            'accuracy': [0.5, 0.49, 0.45, None], 'consistency': [1, 0.97, 0.9, 0.7],
                            'ms_per_token': [1.0, 0.9, 0.7, 0.5]}}


def synthetic_records():
  recs = []
  for s in range(0, 100, 10):
    recs.append({'step': s, 'split': 'train', 'loss': 5 - s / 50, 'accuracy': s / 200,
                 'layers_mean': 4 - s / 100, 'moe/router_entropy': 1.3 - s / 500,
                 'moe/max_prob': 0.3 + s / 1000, 'moe/dropped_frac': 0.1,
                 'moe/load_imbalance': 1.4})
    if s % 50 == 0:
      recs.append({'step': s, 'split': 'eval', 'loss': 5.1 - s / 50, 'accuracy': s / 210,
                   'layers_mean': 4 - s / 90, 'layers_full': 4.0, 'moe/dropped_frac': math.nan})
  return recs


# ---------------------------------------------------------------- plots on synthetic data
def test_every_plot_function_writes_a_png(tmp_path):
  rng = np.random.default_rng(0)
  out = lambda name: str(tmp_path / name)  # noqa: E731
  ids = data.encode('def f(x):\n\treturn x + 1  # é\nThe end.')
  paths = [
      report.plot_training_curves(synthetic_records(), out('curves.png'), full_layers=4),
      report.plot_exit_depth({'code': rng.integers(1, 5, 100), 'prose': rng.integers(0, 5, 80),
                              'empty': np.zeros(0)}, 4, out('exit.png')),
      report.plot_token_compute([('code', ids, rng.integers(1, 5, ids.size)),
                                 ('prose', np.r_[257, ids[:5], 256, 256], np.arange(8) % 5)],
                                4, out('tokens.png'), width=16),
      report.plot_expert_load(rng.random((3, 4)) * 10, [0.1, 0.0, 0.2], out('load.png')),
      report.plot_expert_load(np.zeros((1, 4)), 0.0, out('load_empty.png')),
      report.plot_domain_expert_usage(rng.dirichlet(np.ones(4), (2, 2)), ['code', 'prose'],
                                      out('usage.png')),
      report.plot_domain_expert_usage(rng.dirichlet(np.ones(4), 2), ['code', 'prose'],
                                      out('usage2d.png')),
      report.plot_router_entropy(synthetic_records(), out('router.png'), num_experts=4),
      report.plot_routing_stability([0.1, 0.25], 5, 10, out('stability.png')),
      report.plot_frontier(CALIBRATION, out('frontier.png')),
      report.plot_frontier({**CALIBRATION, 'chosen_threshold': None,
                            'frontier': {k: v for k, v in CALIBRATION['frontier'].items()
                                         if k != 'ms_per_token'}}, out('frontier2.png')),
      compare.plot_compare([{'run': 'a', 'eval_accuracy': 0.4, 'layers_mean': 3.0,
                             'layers_full': 4.0, 'eval_loss': 2.0},
                            {'run': 'b', 'eval_accuracy': None, 'layers_mean': None,
                             'layers_full': None, 'eval_loss': None}], out('compare.png')),
  ]
  for p in paths:
    assert_png(p)


def test_tokens_html_colours_each_byte():
  html = report.tokens_html(np.r_[data.encode('a<\n'), 256], [1, 2, 4, 0], 4)
  assert html.count('<span title=') == 3  # PAD is not shown
  assert '&lt;' in html and '<br>' in html and 'title="4 layers"' in html


# ---------------------------------------------------------------- telemetry known answers
def test_depth_histogram_known_answer():
  layers = np.array([[1, 2, 2, 4], [4, 4, 0, 3]])
  np.testing.assert_allclose(telemetry.depth_histogram(layers, 4),
                             [1 / 8, 1 / 8, 2 / 8, 1 / 8, 3 / 8])
  mask = np.array([[1, 1, 0, 0], [0, 1, 0, 0]])  # keeps 1, 2, 4
  np.testing.assert_allclose(telemetry.depth_histogram(layers, 4, mask), [0, 1, 1, 0, 1] / np.r_[3.])
  np.testing.assert_array_equal(telemetry.depth_histogram(np.zeros(0), 2), [0, 0, 0])
  with pytest.raises(ValueError):
    telemetry.depth_histogram([5], 4)


def test_routing_stability_per_layer_ignores_unrouted_tokens():
  a = np.array([[[0, 1, 2, -1]], [[3, 3, 3, 3]]])   # [layers=2, B=1, L=4]
  b = np.array([[[0, 2, -1, 1]], [[3, 1, 1, 3]]])
  # layer 0: tokens 0, 1 routed in both, token 1 changed -> 1/2; layer 1: 2 of 4 changed.
  np.testing.assert_allclose(telemetry.routing_stability_per_layer(a, b), [0.5, 0.5])
  mask = np.array([[1, 0, 1, 1]])  # layer 0: only token 0 -> 0; layer 1: tokens 0, 2, 3 -> 1/3
  np.testing.assert_allclose(telemetry.routing_stability_per_layer(a, b, mask), [0.0, 1 / 3])
  with pytest.raises(ValueError):
    telemetry.routing_stability_per_layer(a, b[:1])


def test_aux_histograms_known_answer():
  aux = {'layers': np.array([[2., 4., 4.], [1., 3., 0.]]),
         'exit_step': np.array([[0, 1, 1], [0, 1, 0]]),
         'valid': np.array([[True, True, True], [True, True, False]]),
         'moe': {'top1_expert': np.array([[[0, 1, -1], [2, 2, 0]]]),   # [1 layer, B, L]
                 'load': np.array([[1., 3., 0., 0.]])}}
  h = telemetry.aux_histograms(aux)  # default mask: aux['valid']
  np.testing.assert_array_equal(h['layers_executed'], [2, 4, 4, 1, 3])
  np.testing.assert_array_equal(h['exit_step'], [0, 1, 1, 0, 1])
  np.testing.assert_array_equal(h['moe/top1_expert/layer_0'], [0, 1, 2, 2])  # -1 and pad out
  np.testing.assert_allclose(h['moe/load_share'], [0.25, 0.75, 0, 0])
  h = telemetry.aux_histograms({'layers': aux['layers']}, np.array([[1, 0, 0], [0, 0, 1]]),
                               prefix='train/')
  assert set(h) == {'train/layers_executed'}
  np.testing.assert_array_equal(h['train/layers_executed'], [2, 0])


# ---------------------------------------------------------------- real tiny runs
@pytest.fixture(scope='module')
def moe_run(shared_runs, tmp_path_factory):
  """A copy of the suite's shared run 'lm': 10 steps of a 4-layer confidence-exit top_k MoE
  model, checkpoints at 5 and 10, eval every 5; with a calibration.json."""
  workdir = shared_runs.copy('lm', str(tmp_path_factory.mktemp('moe_run') / 'tiny_moe_run'))
  with open(os.path.join(workdir, 'calibration.json'), 'w') as f:
    json.dump(CALIBRATION, f)
  return workdir


def test_make_report_writes_every_png(moe_run):
  lines = []
  paths = report.make_report(moe_run, log=lines.append)
  names = {os.path.basename(p) for p in paths}
  assert names == {'training_curves.png', 'exit_depth_domain.png', 'token_compute.png',
                   'expert_load.png', 'domain_expert_usage.png', 'router_entropy.png',
                   'routing_stability.png', 'frontier.png'}
  for p in paths:
    assert os.path.dirname(p) == os.path.join(moe_run, 'report')
    assert_png(p)
  assert any('ETA' in line for line in lines)  # progress on the slow (forward) part


def test_no_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=str(tmp_path / 'metrics.jsonl')):
    report.make_report(str(tmp_path))
  proc = subprocess.run([sys.executable, '-m', 'experiments.report', f'--workdir={tmp_path}'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2  # a user error: one line, as in every binary
  assert proc.stderr.startswith('error: no metrics file at') and proc.stderr.count('\n') == 1
  with pytest.raises(ValueError, match='metrics.jsonl'):
    compare.compare_runs([str(tmp_path)])


def _dense_run(path):
  """A run without MoE keys or train records: its MoE / tok/s cells must read '-'."""
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'halting': {'name': 'act'}, 'moe': {'router': 'none'},
               'model': {'num_layers': 4}}, f)
  with telemetry.MetricsWriter(path) as w:
    w.write_scalars(10, {'loss': 3.0, 'accuracy': 0.25, 'layers_mean': 2.5}, split='eval')
  return path


def test_compare_table_and_png(moe_run, tmp_path):
  dense = _dense_run(str(tmp_path / 'dense_act'))
  table, rows = compare.compare_runs([moe_run, dense], out=str(tmp_path / 'c.png'))
  lines = table.splitlines()
  for title in ('run', 'halting', 'router', 'eval loss', 'eval acc', 'layers/full', 'tok/s',
                'dropped', 'imbalance'):
    assert title in lines[0]
  assert os.path.basename(moe_run) in lines[2] and 'confidence' in lines[2]
  assert 'top_k' in lines[2] and '/4' in lines[2] and '%' in lines[2]
  assert lines[3].split()[:3] == ['dense_act', 'act', 'none']
  assert lines[3].split()[-3:] == ['-', '-', '-']  # tok/s, dropped, imbalance
  assert '2.50/4' in lines[3]
  assert rows[0]['tokens_per_sec'] > 0 and rows[1]['dropped_frac'] is None
  assert_png(str(tmp_path / 'c.png'))
  proc = subprocess.run([sys.executable, '-m', 'experiments.compare', moe_run, dense,
                         f'--out={tmp_path / "cli"}'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert 'dense_act' in proc.stdout and os.path.basename(moe_run) in proc.stdout
  assert_png(str(tmp_path / 'cli' / 'compare.png'))  # --out is a directory, as everywhere


def test_aux_histograms_accepts_flattened_tokens():
  # The eval loop passes tokens flattened: layers [1, T], top1_expert [layers, T].
  h = telemetry.aux_histograms({'layers': np.array([[1., 2., 3.]]),
                                'moe': {'top1_expert': np.array([[0, -1, 1]]),
                                        'load': np.array([[1., 1.]])}},
                               weights=np.array([[1., 1., 0.]]), prefix='eval/')
  np.testing.assert_array_equal(h['eval/layers_executed'], [1, 2])
  np.testing.assert_array_equal(h['eval/moe/top1_expert/layer_0'], [0])
