"""validate(config): every impossible value fails before compiling, naming the field."""
import os

import pytest

from act_jax import config as config_lib
from act_jax.errors import ConfigError
from experiments.configs import lm, lm_exit12, synthetic

BAD = [
    ('model.d_model', 0, 'model.d_model'),
    ('model.num_heads', 5, 'model.num_heads'),            # does not divide d_model=128
    ('model.num_layers', -2, 'model.num_layers'),
    ('model.d_ff', 0, 'model.d_ff'),
    ('model.vocab_size', 100, 'model.vocab_size'),        # smaller than the byte vocab
    ('model.dtype', 'float8', 'model.dtype'),
    ('model.remat', 'sometimes', 'model.remat'),
    ('model.head_dim', 7, 'model.head_dim'),              # RoPE needs even
    ('model.max_len', 8, 'model.max_len'),                # shorter than data.seq_len
    ('model.causal', False, 'model.causal'),              # LM data needs a causal model
    ('data.seq_len', 0, 'data.seq_len'),
    ('data.batch_size', -1, 'data.batch_size'),
    ('data.name', 'imagenet', 'data.name'),
    ('data.heldout_fraction', 1.5, 'data.heldout_fraction'),
    ('train.lr', 0.0, 'train.lr'),
    ('train.steps', 0, 'train.steps'),
    ('train.warmup_steps', 5000, 'train.warmup_steps'),
    ('train.nonfinite', 'ignore', 'train.nonfinite'),
    ('train.clip_norm', -1.0, 'train.clip_norm'),
    ('mesh.expert', 3, 'mesh'),                           # 1 device: 1*3*1 != 1
    ('mesh.data', 4, 'mesh'),
    ('mesh.model', 0, 'mesh.model'),
    ('halting.name', 'sometimes', 'halting.name'),
    ('halting.cost_warmup', -5, 'halting.cost_warmup'),
    ('train.certify_tolerance', 1.5, 'train.certify_tolerance'),
    ('data.train_max_difficulty', 2, 'data.train_max_difficulty'),  # text has no difficulty
    ('moe.router', 'random', 'moe.router'),
]


def _set(config, field, value):
  node = config
  *path, last = field.split('.')
  for p in path:
    node = node[p]
  node[last] = value


@pytest.mark.parametrize('field,value,named', BAD, ids=[b[0] + '=' + str(b[1]) for b in BAD])
def test_bad_config_names_the_field(field, value, named):
  config = lm.get_config()
  _set(config, field, value)
  with pytest.raises(ConfigError, match=named.replace('.', r'\.')):
    config_lib.validate(config, device_count=1)


def test_unknown_names_list_the_known_ones():
  config = lm.get_config()
  config.halting.name = 'sometimes'
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config, device_count=1)
  for known in ('act', 'pondernet', 'confidence', 'learned_exit', 'mod', 'none'):
    assert known in str(e.value)


@pytest.mark.parametrize('mesh, model, named, words', [
    (dict(fsdp=3), {}, 'mesh', 'must divide the device count 8'),
    (dict(data=2, fsdp=2), {}, 'mesh', 'must equal the device count 8'),  # 2*2*1*1 != 8
    (dict(fsdp=0), {}, 'mesh.fsdp', 'positive integer'),
    (dict(fsdp=8), dict(d_model=36, num_heads=2), 'mesh.fsdp', 'd_model=36'),
    (dict(model=8), dict(num_heads=4), 'mesh.model', 'num_heads=4'),
    (dict(data=2, fsdp=2, model=2), dict(vocab_size=261), 'mesh.model', 'vocab_size=261'),
])
def test_layout_errors_name_the_field(mesh, model, named, words):
  config = lm.get_config()
  config.mesh.update(mesh)
  config.model.update(model)
  with pytest.raises(ConfigError, match=named.replace('.', r'\.')) as e:
    config_lib.validate(config, device_count=8)
  assert words in str(e.value)


def test_batch_splits_over_data_fsdp_and_expert():
  config = lm.get_config('router=top_k')
  config.mesh.update(data=1, fsdp=4, expert=2)
  config.data.batch_size = 12
  with pytest.raises(ConfigError, match='mesh.data\\*mesh.fsdp\\*mesh.expert \\(8\\)'):
    config_lib.validate(config, device_count=8)
  config.data.batch_size = 16
  assert config_lib.validate(config, device_count=8).mesh.shape == (1, 4, 2, 1)


def test_layers_must_divide_into_scan_groups():
  config = lm.get_config('router=top_k')
  config.model.num_layers = 5  # MoE every 2 layers: groups of 2
  with pytest.raises(ConfigError, match='model.num_layers'):
    config_lib.validate(config, device_count=1)


def test_shipped_configs_are_valid():
  for cfg in (lm.get_config(), lm.get_config('runlocal'), lm.get_config('halting=act'),
              synthetic.get_config('task=parity'), synthetic.get_config('task=addition'),
              lm_exit12.get_config(), lm_exit12.get_config('gpu'),
              lm_exit12.get_config('gpu,halting=learned_exit'), synthetic.get_config('task=hops')):
    config_lib.validate(cfg, device_count=1)
  config_lib.validate(lm.get_config(), device_count=8)  # mesh.data=-1 fills the devices


def test_unknown_config_arg_is_rejected():
  with pytest.raises(ConfigError, match='unknown config arg'):
    lm.get_config('runlocall')


# ------------------------------------------------------------ every variant one flag away
import jax  # noqa: E402

from act_jax.model import halting as halting_lib  # noqa: E402
from act_jax.model import moe as moe_lib  # noqa: E402
from act_jax.run import state as run_state  # noqa: E402
from act_jax.scale import sharding  # noqa: E402
from tests.conftest import binary_cases  # noqa: E402


@pytest.mark.parametrize('policy', sorted(halting_lib.POLICIES))
def test_every_halting_policy_is_one_flag_from_lm_runlocal(policy):
  """--config.halting.name=X on lm.py:runlocal resolves and builds a train state for every
  registered policy; the exit recipe (exit_aware, distill) applies exactly where the policy
  supports it and the header note says so."""
  c = lm.get_config('runlocal')
  c.halting.name = policy
  spec = config_lib.resolve(c, device_count=1)
  cls = halting_lib.POLICIES[policy]
  assert spec.halting.exit_aware == (0.5 if cls.supports_exit_aware else 0.0)
  assert spec.halting.distill == (0.5 if cls.supports_distill else 0.0)
  note = config_lib.where_supported_note(spec)
  assert ('exit_aware=0.5' in note) == cls.supports_exit_aware
  assert ('does not support' in note) == (not cls.supports_exit_aware)
  abstract, _ = run_state.state_shardings(spec, sharding.make_mesh(shape=(1, 1, 1, 1)))
  assert jax.tree.leaves(abstract['params'])


@pytest.mark.parametrize('router', sorted(r for r, info in moe_lib.ROUTERS.items()
                                          if info.causal_ok))
def test_every_causal_router_is_one_flag_from_lm_runlocal(router):
  c = lm.get_config('runlocal')
  c.moe.router = router
  spec = config_lib.resolve(c, device_count=1)
  abstract, _ = run_state.state_shardings(spec, sharding.make_mesh(shape=(1, 1, 1, 1)))
  assert spec.moe.router == router and jax.tree.leaves(abstract['params'])


def test_where_supported_is_refused_when_asked_for_by_name(tmp_path):
  """The train binary: act trains one flag away (header names what is off); asking for
  exit-aware training with act by name is refused naming the field; a bad where_supported
  entry names the field and the known options."""
  base = ['--config=experiments/configs/lm.py:runlocal', '--config.halting.name=act',
          '--config.train.steps=2', '--config.train.eval_every=2',
          '--config.train.checkpoint_every=2', '--config.train.eval_batches=1']
  # one interpreter per case: --config.* override flags are defined per parse
  (ok,), (explicit,), (bad,) = (binary_cases('experiments.train', [base + extra]) for extra in (
      [f'--workdir={tmp_path}/act'],
      [f'--workdir={tmp_path}/x', '--config.halting.exit_aware=0.5'],
      [f'--workdir={tmp_path}/y', '--config.halting.where_supported=exit_aware,beta']))
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert 'halting where supported: exit_aware off (act does not support it)' in ok.stdout
  assert explicit.returncode == 2 and 'Traceback' not in explicit.stderr
  assert "halting.exit_aware=0.5 needs a policy that supports exit-aware" in explicit.stderr
  assert bad.returncode == 2 and "'beta' is not a policy-dependent option" in bad.stderr
  assert not os.path.exists(f'{tmp_path}/x/checkpoints')
