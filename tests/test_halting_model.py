"""Halting policies inside the model: each trains by flag, runtime thresholds, one compile."""
import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from act_jax import training
from act_jax.model import make_model
from experiments.configs import lm, synthetic


@pytest.mark.parametrize('policy', ['act', 'pondernet', 'confidence', 'learned_exit', 'mod'])
def test_each_policy_trains_by_flag(policy, tmp_path):
  config = lm.get_config(f'halting={policy},runlocal')
  config.model.num_layers = 4
  config.train.update(steps=4, eval_every=1000, log_every=2)
  lines = []
  res = training.train_and_evaluate(config, str(tmp_path), log=lines.append)
  assert np.isfinite(res['loss'])
  assert 1.0 <= res['layers_mean'] <= 4.0
  assert any('exit depth' in l for l in lines)  # the histogram is in the log
  expected_term = {'act': 'ponder', 'pondernet': 'kl', 'learned_exit': 'exit_bce',
                   'mod': 'mod_predictor', 'confidence': 'task'}[policy]
  from act_jax import telemetry
  train_rows = telemetry.read_metrics(str(tmp_path), split='train')
  assert expected_term in train_rows[-1]


def test_act_halting_tracks_parity_difficulty_keys(tmp_path):
  config = synthetic.get_config('task=parity,halting=act,runlocal')
  config.train.update(steps=3, eval_every=1000)
  res = training.train_and_evaluate(config, str(tmp_path), log=lambda s: None)
  assert 'spearman_layers_difficulty' in res
  assert any(k.startswith('difficulty_') for k in res)


def test_forward_compiles_once_across_thresholds():
  config = lm.get_config('halting=confidence,runlocal')
  model = make_model(config)
  tokens = jax.numpy.zeros((2, 32), jax.numpy.int32)
  v = nn.unbox(model.init(jax.random.PRNGKey(0), tokens))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fwd(v, t, thr):
    return model.apply(v, t, threshold=thr)[1]['layers']

  for thr in (0.1, 0.5, 0.9, 1.0):
    fwd(v, tokens, thr)


def _exit_setup(policy: str):
  config = lm.get_config(f'halting={policy},router=none,runlocal')  # 4 steps of 1 layer
  tokens = jax.random.randint(jax.random.PRNGKey(3), (3, 32), 1, 256)
  v = nn.unbox(make_model(config).init(jax.random.PRNGKey(0), tokens))
  score = {'confidence': 'confidence', 'learned_exit': 'exit_prob'}[policy]
  fwd = jax.jit(lambda thr: make_model(config).apply(v, tokens, threshold=thr)[1])
  s = np.asarray(fwd(2.0)[score])[:-1]
  for q in np.linspace(0.3, 0.99, 24):  # a threshold that spreads the exit steps
    thr = float(np.quantile(s, q))
    counts = np.bincount(np.asarray(fwd(thr)['exit_step']).ravel(), minlength=4)
    if counts[0] >= 3 and counts[-1] >= 3 and (counts >= 2).sum() >= 3 - (policy == "confidence"):
      return config, tokens, v, thr
  raise AssertionError('no threshold spreads the exits')


@pytest.mark.parametrize('policy', ['confidence', 'learned_exit'])
def test_exit_aware_training_forward_matches_real_exits(policy):
  """With halting.exit_aware, the training forward's logits at each token's criterion step
  equal the logits of inference with real exits (frozen states, KV from the exit state).
  Plain training (exit_aware=0) does not: there deeper layers see unexited context."""
  config, tokens, v, thr = _exit_setup(policy)
  logits, aux = make_model(config).apply(v, tokens, threshold=thr)
  exit_step = np.asarray(aux['exit_step'])
  gaps = {}
  for aware in (0.5, 0.0):
    config.halting.exit_aware = aware
    _, taux = make_model(config, train=True).apply(v, tokens, threshold=thr,
                                                   rngs={'halting': jax.random.PRNGKey(1)})
    if aware:  # plain training scores the exits on other states: its steps may differ
      np.testing.assert_array_equal(np.asarray(taux['criterion_step']), exit_step)
    step_logits = np.asarray(taux['step_logits'])  # [N,B,L,V]
    at_exit = np.take_along_axis(step_logits, exit_step[None, ..., None], 0)[0]
    gaps[aware] = np.abs(at_exit - np.asarray(logits)).max()
  assert gaps[0.5] < 1e-4, gaps
  assert gaps[0.0] > 1e-2, gaps  # the mismatch exit-aware training removes


def test_exit_aware_samples_row_thresholds_and_trains(tmp_path):
  config, tokens, v, _ = _exit_setup('confidence')
  config.halting.exit_aware = 0.3
  model = make_model(config, train=True)
  crit = [np.asarray(model.apply(v, tokens, rngs={'halting': jax.random.PRNGKey(k)})[1]
                     ['criterion_step']) for k in range(2)]
  assert not np.array_equal(crit[0], crit[1])  # thresholds drawn per row from U(0.3, 1)
  config.train.update(steps=3, eval_every=1000, log_every=1)
  res = training.train_and_evaluate(config, str(tmp_path), log=lambda s: None)
  assert np.isfinite(res['loss'])
