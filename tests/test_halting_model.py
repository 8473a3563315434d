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
