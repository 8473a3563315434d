"""MoE inside the model and the training loop: it learns, uses every expert, balances."""
import jax
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax import data
from act_jax.scale import sharding
from act_jax.run import state as run_state
from act_jax.train import training
from act_jax.errors import ConfigError
from experiments.configs import lm


def test_tiny_moe_lm_trains_and_uses_every_expert(tmp_path):
  """Trains a tiny top-k MoE LM for 60 steps."""
  config = lm.get_config('halting=none,router=top_k,runlocal')
  config.model.num_layers = 4
  config.moe.update(num_experts=4, bias_rate=1e-3, shared_experts=1)
  config.train.update(steps=60, eval_every=1000, checkpoint_every=60)
  mesh = sharding.make_mesh(shape=(1, 1, 1, 1))
  _, sh = run_state.state_shardings(config, mesh)
  init = run_state.init_state(config, mesh, sh)
  ds = data.make_dataset(config.data, config.seed)
  before = training.evaluate(config, init, jax.jit(training.make_eval_step(config)),
                             ds.eval_batches(config.train.eval_batches), ds.domains)
  res = training.train_and_evaluate(config, str(tmp_path), log=lambda s: None)
  assert res['loss'] < before['loss'] - 1.0, (before['loss'], res['loss'])
  assert res['moe/unused_experts'] == 0
  assert 0.0 <= res['moe/dropped_frac'] < 0.5
  # The DeepSeek-V3 bias moved (outside the optimiser) and was checkpointed.
  from tests.test_training import final_params
  _, state = final_params(config, str(tmp_path))
  bias = state['moe_state']['stack']['layer_1']['moe']['bias']
  assert bias.shape == (2, 4) and np.abs(bias).sum() > 0


@pytest.mark.parametrize('router', ['expert_choice', 'soft'])
def test_non_causal_routers_are_refused_for_causal_models(router):
  config = lm.get_config(f'router={router}')
  with pytest.raises(ConfigError, match='moe.router|causal'):
    config_lib.validate(config, device_count=1)


def test_non_causal_routers_train_an_encoder(tmp_path):
  from experiments.configs import synthetic
  config = synthetic.get_config('task=parity,router=expert_choice,runlocal')
  config.model.num_layers = 2
  config.train.update(steps=3, eval_every=1000)
  res = training.train_and_evaluate(config, str(tmp_path), log=lambda s: None)
  assert np.isfinite(res['loss'])


@pytest.mark.parametrize('field,value,named', [
    ('top_k', 9, 'moe.top_k'), ('capacity_factor', 0.0, 'moe.capacity_factor'),
    ('router', 'magic', 'moe.router'), ('priority', 'probability', 'moe.priority')])
def test_bad_moe_configs(field, value, named):
  config = lm.get_config('router=top_k')
  config.moe[field] = value
  with pytest.raises(ConfigError, match=named.replace('.', r'\.')):
    config_lib.validate(config, device_count=1)


def test_experts_must_divide_the_expert_axis():
  config = lm.get_config('router=top_k')
  config.moe.num_experts = 6
  config.mesh.update(data=2, expert=4)
  with pytest.raises(ConfigError, match='num_experts'):
    config_lib.validate(config, device_count=8)
