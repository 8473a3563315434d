"""Known-answer tests for act_jax.telemetry (hand-computed values)."""
import json
import math

import numpy as np
import pytest

from act_jax import telemetry as tm


def test_expert_load_counts_skip_dropped_and_masked():
  idx = np.array([[0, 2, -1, 2],
                  [1, 2, 0, -1]])
  np.testing.assert_array_equal(tm.expert_load(idx, 4), [2, 1, 3, 0])
  mask = np.array([[1, 1, 1, 0],   # drops one routing to expert 2
                   [0, 1, 1, 1]])  # drops the routing to expert 1
  np.testing.assert_array_equal(tm.expert_load(idx, 4, mask), [2, 0, 2, 0])


def test_expert_load_topk_with_token_mask():
  idx = np.array([[[0, 1], [1, 2]], [[2, 0], [-1, 1]]])  # [B=2, L=2, k=2]
  mask = np.array([[1, 0], [1, 1]])                       # token mask [B, L]
  np.testing.assert_array_equal(tm.expert_load(idx, 3, mask), [2, 2, 1])
  with pytest.raises(ValueError):
    tm.expert_load(idx, 2)  # index 2 does not exist with 2 experts


def test_load_imbalance():
  assert tm.load_imbalance([3, 3, 3]) == 1.0
  assert tm.load_imbalance([6, 0, 0]) == 3.0
  assert math.isnan(tm.load_imbalance([0, 0, 0]))


def test_router_entropy_uniform_and_one_hot():
  E = 8
  uniform = np.full((2, 5, E), 1.0 / E)
  assert tm.router_entropy(uniform) == pytest.approx(math.log(E))
  one_hot = np.eye(E)[np.arange(10) % E]
  assert tm.router_entropy(one_hot) == pytest.approx(0.0, abs=1e-12)
  # Mixed: mask keeps only the one-hot token.
  probs = np.stack([uniform[0, 0], one_hot[0]])
  assert tm.router_entropy(probs) == pytest.approx(math.log(E) / 2)
  assert tm.router_entropy(probs, mask=[False, True]) == pytest.approx(0.0, abs=1e-12)
  assert math.isnan(tm.router_entropy(probs, mask=[0, 0]))


def test_dropped_fraction():
  dropped = np.array([[1, 0, 0, 0], [1, 1, 0, 0]])
  assert tm.dropped_fraction(dropped) == pytest.approx(3 / 8)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
  assert tm.dropped_fraction(dropped, mask) == pytest.approx(3 / 6)


def test_routing_stability():
  a = np.array([0, 1, 2, 3, 0, 1, 2, 3])
  b = np.array([0, 1, 2, 0, 0, 1, 1, 3])  # positions 3 and 6 changed
  assert tm.routing_stability(a, b) == pytest.approx(0.25)
  assert tm.routing_stability(a, a) == 0.0
  mask = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
  assert tm.routing_stability(a, b, mask) == pytest.approx(1 / 7)


def test_domain_expert_usage():
  top1 = np.array([[0, 0, 1, -1],
                   [2, 2, 2, 1],
                   [1, 1, 0, 0]])
  domain = np.array([0, 1, 0])
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
  usage = tm.domain_expert_usage(top1, domain, num_domains=3, num_experts=3, mask=mask)
  # domain 0: experts 0,0,1 (row 0, -1 skipped) + 1,1,0 (row 2, last masked) -> 3x0, 3x1
  np.testing.assert_allclose(usage[0], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(usage[1], [0.0, 0.25, 0.75])
  np.testing.assert_array_equal(usage[2], [0, 0, 0])  # domain with no tokens
  np.testing.assert_allclose(usage[:2].sum(1), 1.0)


def test_spearman_hand_value_and_constant():
  # ranks x: 1..5, ranks y: 2,1,4,3,5 -> d^2 = 1+1+1+1+0 = 4 -> 1 - 6*4/(5*24) = 0.8
  assert tm.spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
  assert tm.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert math.isnan(tm.spearman([1, 1, 1], [1, 2, 3]))
  # Ties: x ranks 1.5,1.5,3 ; y ranks 1,2,3 -> pearson of those.
  rx, ry = np.array([1.5, 1.5, 3]), np.array([1.0, 2, 3])
  expected = np.corrcoef(rx, ry)[0, 1]
  assert tm.spearman([7, 7, 9], [1, 2, 3]) == pytest.approx(expected)


def test_spearman_matches_scipy_with_ties():
  stats = pytest.importorskip('scipy.stats')
  rng = np.random.default_rng(0)
  for _ in range(5):
    x = rng.integers(0, 6, size=200)  # many ties
    y = x + rng.integers(0, 4, size=200)
    assert tm.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_histogram_and_mean_by_bucket():
  counts, edges = tm.histogram([0.1, 0.4, 0.6, 0.9, np.nan, 0.95], bins=[0, 0.5, 1.0])
  np.testing.assert_array_equal(counts, [2, 3])
  np.testing.assert_array_equal(edges, [0, 0.5, 1.0])
  counts, edges = tm.histogram([1, 2, 3, 4], bins=2, mask=[1, 1, 0, 1])
  np.testing.assert_array_equal(counts, [2, 1])
  np.testing.assert_allclose(edges, [1, 2.5, 4])

  layers = np.array([[2, 4], [6, 8], [12, 12]])  # per-token layers executed, [B, L]
  by_domain = tm.mean_by_bucket(layers, [0, 1, 0])  # per-sequence buckets
  assert by_domain == {0: pytest.approx(7.5), 1: pytest.approx(7.0)}
  by_tok = tm.mean_by_bucket([1.0, 2.0, 3.0, 5.0], [2, 2, 5, 7], mask=[1, 1, 1, 0])
  assert by_tok == {2: 1.5, 5: 3.0}


def test_flatten_metrics():
  jnp = pytest.importorskip('jax.numpy')
  tree = {'loss': np.float32(1.5), 'moe': {'layer0': {'imb': jnp.asarray(2.0), 'n': 3},
                                          'hist': np.ones(4)},
          'flag': True, 'name': 'x', 'one': np.array(0.25)}
  assert tm.flatten_metrics(tree) == {'loss': 1.5, 'moe/layer0/imb': 2.0, 'moe/layer0/n': 3.0,
                                      'flag': 1.0, 'one': 0.25}
  assert tm.flatten_metrics({'a': 1}, prefix='aux') == {'aux/a': 1.0}


def test_metrics_writer_roundtrip_truncation_and_restart(tmp_path):
  w = tm.MetricsWriter(tmp_path)
  w.write_scalars(0, {'loss': 3.0, 'aux': {'imb': 1.2}})
  w.write_scalars(1, {'loss': 2.0, 'bad': float('nan')})
  w.write_scalars(1, {'acc': 0.5}, split='eval')
  w.write_histograms(1, {'layers': np.array([1, 2, 2, 3.0]), 'empty': np.array([])})
  w.close()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert json.loads(lines[1]) == {'step': 1, 'split': 'train', 'loss': 2.0, 'bad': None}
  recs = tm.read_metrics(tmp_path, split='train')
  assert [r['step'] for r in recs] == [0, 1]
  assert recs[0]['aux/imb'] == 1.2 and math.isnan(recs[1]['bad'])
  assert tm.read_metrics(tmp_path, split='eval') == [{'step': 1, 'split': 'eval', 'acc': 0.5}]
  assert list((tmp_path / 'tb').glob('events.out.tfevents.*'))

  with open(tmp_path / 'metrics.jsonl', 'a') as f:  # kill -9 in the middle of a line
    f.write('{"step": 2, "split": "train", "lo')
  assert [r['step'] for r in tm.read_metrics(tmp_path, 'train')] == [0, 1]

  # Restart from a checkpoint at step 1: step 1 is logged again, the old line loses.
  with tm.MetricsWriter(tmp_path) as w2:
    w2.write_scalars(1, {'loss': 1.5})
    w2.write_scalars(2, {'loss': 1.0})
  recs = tm.read_metrics(tmp_path, 'train')
  assert [(r['step'], r['loss']) for r in recs] == [(0, 3.0), (1, 1.5), (2, 1.0)]
  assert len(tm.read_metrics(tmp_path)) == 4  # eval record untouched


def test_read_metrics_drops_abandoned_steps_after_restart(tmp_path):
  with tm.MetricsWriter(tmp_path) as w:
    for s in range(5):
      w.write_scalars(s, {'loss': float(s)})
    for s in (2, 3):  # restarted from step 2, killed again at 3: old step 4 is stale
      w.write_scalars(s, {'loss': 10.0 + s})
  recs = tm.read_metrics(tmp_path)
  assert [(r['step'], r['loss']) for r in recs] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]


def test_metrics_writer_disabled_and_reserved(tmp_path):
  w = tm.MetricsWriter(tmp_path / 'off', enabled=False)
  w.write_scalars(0, {'loss': 1.0})
  w.write_histograms(0, {'x': np.ones(3)})
  w.flush()
  w.close()
  assert not (tmp_path / 'off').exists()
  assert tm.read_metrics(tmp_path / 'off') == []
  with tm.MetricsWriter(tmp_path / 'on') as w:
    with pytest.raises(ValueError, match='reserved'):
      w.write_scalars(0, {'step': 1.0})


def test_format_eta():
  assert tm.format_eta(45) == '45s'
  assert tm.format_eta(123) == '2m03s'
  assert tm.format_eta(3725) == '1h02m'
  assert tm.format_eta(59.6) == '1m00s'
  assert tm.format_eta(-3) == '0s'
  assert tm.format_eta(float('nan')) == '?'


def test_progress_uses_moving_rate():
  now = [0.0]
  p = tm.Progress(500, start=100, window=3, clock=lambda: now[0])
  now[0] = 10.0
  # 20 steps in 10 s since the (resumed) start -> 2.0 it/s; 380 left -> 190 s
  assert p.update(120) == 'step 120/500 (24%) 2.0 it/s ETA 3m10s'
  now[0] = 20.0
  p.update(140)
  now[0] = 21.0
  # window of 3 samples: (10, 120) .. (21, 160) -> 40 / 11 s
  line = p.update(160)
  assert line.startswith('step 160/500 (32%) 3.6 it/s ETA 1m')
  assert p.rate == pytest.approx(40 / 11)
  fresh = tm.Progress(10, clock=lambda: 0.0)
  assert fresh.update(0) == 'step 0/10 (0%) ? it/s ETA ?'


def test_collapse_on_hand_made_histograms():
  # 8 steps; fractions of scored tokens per number of steps run
  assert tm.collapse({1: 0.95, 2: 0.05}, 8) == 'all at step 1 (95% of tokens)'
  assert tm.collapse({8: 1.0}, 8) == 'all at the maximum 8 (100% of tokens)'
  assert tm.collapse({1: 0.5, 8: 0.5}, 8) == ''            # bimodal: adapts
  assert tm.collapse({2: 0.3, 3: 0.4, 4: 0.3}, 8) == ''     # in between
  assert tm.collapse({1: 0.89, 5: 0.11}, 8) == ''           # just under the 90 % line
  assert tm.collapse({1: 0.89, 5: 0.11}, 8, frac=0.85) != ''
  assert tm.collapse([0, 19, 1, 0], 3) == 'all at step 1 (95% of tokens)'  # counts work too
  assert tm.collapse([0, 0, 0, 0], 3) == ''                 # nothing scored: no verdict
  # any constant depth collapses, not only the two ends (a cell halting every row at 6)
  assert tm.collapse({6: 1.0}, 20) == 'all at step 6 (100% of tokens)'
  assert tm.collapse({5: 0.05, 6: 0.92, 7: 0.03}, 20) == 'all at step 6 (92% of tokens)'
  assert tm.collapse([0, 0, 1, 18, 1], 4) == 'all at step 3 (90% of tokens)'  # counts
  assert tm.collapse({3: 0.5, 4: 0.5}, 8) == ''              # two depths: adapts
  assert tm.collapse({3: 0.85, 4: 0.15}, 8) == ''            # under the 90 % line
  assert tm.collapse({3: 0.85, 4: 0.15}, 8, frac=0.8) == 'all at step 3 (85% of tokens)'
  # the same verdict from per-token layers through depth_histogram
  layers = np.array([[8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 3]])
  assert tm.collapse(tm.depth_histogram(layers, 8), 8) == 'all at the maximum 8 (91% of tokens)'
