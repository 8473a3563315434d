"""The vector tasks' step model (act_jax/model/step_cell.py) and its data (parity_vector).

Known answers: an Elman cell with hand-set weights computes parity, and a hand-set clock
makes ACT and PonderNet halt at step 2, with the same logits, halting step and steps run
through the masked scan (StepCellModel) and the while loop (step_cell.forward_while).
Every halting policy runs through the cell by the same HaltingPolicy interface. The data:
±1/0 vectors with exactly d non-zeros, labels recomputed from the vector, the training
split never above bits/2. Learning: the runlocal config learns 8-entry parity above chance.
"""
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax import data as data_lib
from act_jax.errors import ConfigError
from act_jax.infer import inference
from act_jax.model import halting as halting_lib
from act_jax.model import step_cell
from act_jax.model.transformer import make_model
from act_jax.train import training
from experiments.configs import parity_cell

N_ENTRIES = 4
S = 20.0  # tanh slope: tanh(S/2) = 1 - 4e-9, a clean ±1


def _cell_config(halting: str, num_steps: int, d_model: int, kind: str = 'elman'):
  c = config_lib.default_config()
  c.data.update(name='parity_vector', num_bits=N_ENTRIES, seq_len=N_ENTRIES, batch_size=8)
  c.model.update(kind=kind, d_model=d_model, num_layers=num_steps)
  c.halting.name = halting
  return c


def _all_vectors() -> np.ndarray:
  return np.asarray(list(itertools.product((-1.0, 0.0, 1.0), repeat=N_ENTRIES)), np.float32)


def _parity_weights(spec, halt_at_step_2: bool) -> dict:
  """Elman weights that compute parity of the +1 entries (n = N_ENTRIES):
    units 0..n-1   indicators   h_i = tanh(S (x_i - 1/2))      = +1 iff x_i = +1 (step 1 on)
    units n..2n-1  thresholds   u_k = tanh(S (count - k + 1/2)) = +1 iff count >= k (step 2 on)
                                count = Σ_i (h_i + 1) / 2 from the previous state
    units 2n, 2n+1 a clock:     a = tanh(S) = 1 from step 1; b = tanh(S (a_prev - 1/2)):
                                -1 at step 1, +1 from step 2
  head: logit_1 - logit_0 = 4 (parity - 1/2), parity = Σ_k (-1)^{k+1} [count >= k];
  halting unit (ACT, PonderNet): 2S·b - 1, so λ ≈ 0 at step 1 and ≈ 1 at step 2."""
  n, d = N_ENTRIES, spec.model.d_model
  w_x, b, w_h = np.zeros((n, d)), np.zeros((d,)), np.zeros((d, d))
  for i in range(n):
    w_x[i, i], b[i] = S, -S / 2
  for k in range(1, n + 1):
    w_h[:n, n + k - 1] = S / 2  # S * count = S/2 Σ h_i + S n/2
    b[n + k - 1] = S * (n / 2 - k + 0.5)
  b[2 * n] = S
  w_h[2 * n, 2 * n + 1], b[2 * n + 1] = S, -S / 2
  head_w, head_b = np.zeros((d, 2)), np.zeros((2,))
  signs = np.asarray([(-1.0) ** (k + 1) for k in range(1, n + 1)])
  head_w[n:2 * n, 1] = 4.0 * signs / 2  # (u_k + 1) / 2 = [count >= k]
  head_b[1] = 4.0 * (signs.sum() / 2 - 0.5)
  stack = {'cell': {'input': {'kernel': w_x, 'bias': b}, 'recurrent': {'kernel': w_h}}}
  if halt_at_step_2:
    halt_w = np.zeros((d, 1))
    halt_w[2 * n + 1, 0] = 2 * S
    stack['halt_unit'] = {'kernel': halt_w, 'bias': np.asarray([-1.0])}
  params = {'head_kernel': head_w, 'head_bias': head_b, 'stack': stack}
  return {'params': jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}


def test_hand_set_elman_cell_computes_parity():
  """Known answer: after two steps the cell's head gives the parity of every 4-entry ±1/0
  vector (all 81), through the scan and the while loop."""
  spec = config_lib.resolve(_cell_config('none', num_steps=2, d_model=2 * N_ENTRIES + 2))
  variables = _parity_weights(spec, halt_at_step_2=False)
  x = _all_vectors()
  want = data_lib.parity_of(x)
  assert want.sum() not in (0, len(x))
  for logits, aux in (make_model(spec).apply(variables, jnp.asarray(x)),
                      inference.forward_while(spec, variables, jnp.asarray(x))):
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[:, 0], -1), want)
    np.testing.assert_array_equal(np.asarray(aux['layers'])[:, 0], 2.0)


@pytest.mark.parametrize('halting', ['act', 'pondernet'])
def test_halting_at_a_fixed_step_scan_equals_while_loop(halting):
  """The clock halts every row at step 2 of 6: same logits (the parity), halting step and
  steps run through the masked scan and the while loop, which stops there."""
  spec = config_lib.resolve(_cell_config(halting, num_steps=6, d_model=2 * N_ENTRIES + 2))
  variables = _parity_weights(spec, halt_at_step_2=True)
  x = jnp.asarray(_all_vectors())
  scan_logits, scan_aux = jax.jit(make_model(spec).apply)(variables, x)
  loop_logits, loop_aux = jax.jit(lambda v, x: inference.forward_while(spec, v, x))(variables, x)
  np.testing.assert_allclose(np.asarray(scan_logits), np.asarray(loop_logits), atol=1e-5)
  for aux in (scan_aux, loop_aux):
    np.testing.assert_array_equal(np.asarray(aux['exit_step'])[:, 0], 1)
    np.testing.assert_array_equal(np.asarray(aux['layers'])[:, 0], 2.0)
  np.testing.assert_array_equal(np.argmax(np.asarray(loop_logits)[:, 0], -1),
                                data_lib.parity_of(_all_vectors()))
  # the while loop ran 2 steps: steps 3..6 left no trace (the scan's frozen rows did run)
  assert not np.asarray(loop_aux['running'])[2:].any()


@pytest.mark.parametrize('halting', sorted(n for n, c in halting_lib.POLICIES.items()
                                           if not c.gates_blocks))
def test_every_policy_runs_through_the_cell(halting):
  """Random weights, the policy's default threshold: scan == while loop, and a train step
  of the shared loss code gives a finite loss and a gradient."""
  cfg = _cell_config(halting, num_steps=5, d_model=16, kind='gru')
  spec = config_lib.resolve(cfg)
  ds = data_lib.make_dataset(spec.data, 0)
  batch = {k: jnp.asarray(v) for k, v in ds.train_batch(0).items()}
  variables = make_model(spec).init({'params': jax.random.PRNGKey(1)}, batch['inputs'])
  scan_logits, scan_aux = make_model(spec).apply(variables, batch['inputs'],
                                                 rngs={'halting': jax.random.PRNGKey(0)})
  loop_logits, loop_aux = inference.forward_while(spec, variables, batch['inputs'])
  np.testing.assert_allclose(np.asarray(scan_logits), np.asarray(loop_logits), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(scan_aux['layers']), np.asarray(loop_aux['layers']))
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
           'opt_state': training.state_lib.make_optimizer(spec.train).init(variables['params']),
           'moe_state': {}}
  new_state, metrics = jax.jit(training.make_train_step(spec))(state, batch,
                                                               jax.random.PRNGKey(2))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0


def test_parity_vector_data_invariants():
  """Exactly d non-zero entries, each ±1; labels = parity of the +1 entries; training never
  above bits/2; evaluation spans 1..bits."""
  spec = config_lib.resolve(parity_cell.get_config('bits=96'))
  assert spec.data.train_max_difficulty == 48
  ds = data_lib.make_dataset(spec.data, 3)
  train = [ds.train_batch(s) for s in range(20)]
  held = ds.eval_batches(8)
  for b in train + held:
    x = b['inputs']
    assert x.dtype == np.float32 and x.shape == (spec.data.batch_size, 96)
    assert set(np.unique(x)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal((x != 0).sum(-1), b['difficulty'])
    np.testing.assert_array_equal(b['targets'][:, 0], (x == 1).sum(-1) % 2)
    assert b['targets'].shape == b['weights'].shape == (spec.data.batch_size, 1)
  d_train = np.concatenate([b['difficulty'] for b in train])
  d_held = np.concatenate([b['difficulty'] for b in held])
  assert d_train.min() >= 1 and d_train.max() == 48
  assert d_held.max() > 48 and d_held.min() >= 1
  assert data_lib.difficulty_ranges(spec.data) == {'in-distribution': (1, 48),
                                                   'extrapolation': (49, 96)}
  # the two streams are drawn apart, and a step's batch is a pure function of (seed, step)
  np.testing.assert_array_equal(ds.train_batch(5)['inputs'], train[5]['inputs'])


def test_config_refuses_what_a_cell_cannot_run():
  bad = [({'model.kind': 'lstm'}, 'model.kind'),
         ({'model.kind': 'transformer'}, 'model.kind'),   # vector data needs a cell
         ({'halting.name': 'mod'}, 'halting.name'),
         ({'moe.router': 'top_k'}, 'moe.router'),
         ({'halting.exit_aware': 0.5, 'halting.name': 'confidence'}, 'halting.exit_aware')]
  for overrides, field in bad:
    c = parity_cell.get_config('runlocal')
    for k, v in overrides.items():
      sec, f = k.split('.')
      c[sec][f] = v
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
      config_lib.validate(c)
  c = config_lib.default_config()
  c.model.kind = 'gru'  # a cell on byte tokens
  with pytest.raises(ConfigError, match=r'data\.name'):
    config_lib.validate(c)
  c = parity_cell.get_config('runlocal')
  c.data.seq_len = 9
  with pytest.raises(ConfigError, match=r'data\.seq_len'):
    config_lib.validate(c)


def test_runlocal_learns_8_entry_parity_above_chance(tmp_path):
  """A real learning check: 400 steps of the runlocal config (PonderNet, GRU, 8 entries)."""
  res = training.train_and_evaluate(parity_cell.get_config('runlocal'),
                                    os.path.join(tmp_path, 'run'), log=lambda m: None)
  assert res['range_in-distribution/accuracy'] >= 0.8, res
  # PonderNet's expected steps Σ n·p_n (full depth, p sums to 1) lies in [1, N]
  assert 1.0 <= res['expected_steps_mean'] <= 6.0
  assert -1.0 <= res['spearman_expected_steps_difficulty'] <= 1.0


def test_expected_steps_is_the_full_depth_halting_distribution_mean():
  """continuous_steps: PonderNet's Σ n·p_n from a full-depth forward (p sums to 1 there, not
  in the thresholded forward); ACT's N + R."""
  for halting in ('pondernet', 'act'):
    spec = config_lib.resolve(_cell_config(halting, num_steps=5, d_model=16, kind='gru'))
    model = make_model(spec)
    x = jnp.asarray(_all_vectors())
    v = model.init({'params': jax.random.PRNGKey(4)}, x)
    _, aux = model.apply(v, x, threshold=0.3)
    cont = np.asarray(training.continuous_steps(model, v, x, aux))
    if halting == 'act':
      np.testing.assert_allclose(cont, np.asarray(aux['ponder']))
      continue
    _, full = model.apply(v, x, threshold=2.0)
    p_NB = np.asarray(full['p'])[:, :, 0]
    np.testing.assert_allclose(p_NB.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(cont[:, 0], (np.arange(1, 6)[:, None] * p_NB).sum(0), rtol=1e-5)
    assert not np.allclose(np.asarray(aux['p']).sum(0), 1.0)  # the thresholded p is cut


def test_parity_cell_variants_are_valid():
  """The shipped variants resolve; PonderNet's sizes are the config's defaults."""
  for arg in ('', 'halting=act', 'cell=elman', 'bits=16,halting=confidence', 'runlocal',
              'runlocal,halting=learned_exit'):
    spec = config_lib.validate(parity_cell.get_config(arg), device_count=1)
    assert step_cell.is_step_cell(spec) and spec.data.name == 'parity_vector'
  spec = config_lib.resolve(parity_cell.get_config())
  assert (spec.model.kind, spec.model.d_model, spec.model.num_steps) == ('gru', 128, 20)
  assert (spec.data.num_bits, spec.data.train_max_difficulty, spec.data.batch_size) == (96, 48,
                                                                                      128)
  assert (spec.train.lr, spec.halting.beta, spec.halting.lambda_p) == (3e-4, 0.01, 0.1)
  for bad in ('cell=lstm', 'bits=x', 'bits=1', 'foo'):
    with pytest.raises(ConfigError):
      parity_cell.get_config(bad)


@pytest.mark.parametrize('halting', ['act', 'pondernet'])
def test_cell_loop_equals_the_reference_driver(halting):
  """halting.drive (the reference depth loop every policy is specified against) with the
  cell as its block and the halting unit / head as its signals gives the model's outputs."""
  spec = config_lib.resolve(_cell_config(halting, num_steps=5, d_model=16, kind='gru'))
  model = make_model(spec)
  x = jnp.asarray(_all_vectors())
  params = model.init({'params': jax.random.PRNGKey(7)}, x)['params']
  unit = params['stack']['halt_unit']  # a steeper halting unit: rows stop at different steps
  params['stack']['halt_unit'] = {'kernel': unit['kernel'] * 10.0, 'bias': unit['bias'] * 0.0}
  logits, aux = model.apply({'params': params}, x)
  stack, head = params['stack'], {'w_DV': params['head_kernel'], 'b_V': params['head_bias']}
  x_BLI = x[:, None, :]
  cell = step_cell.STEP_CELLS['gru'](16)
  block_fn = lambda h, i: cell.apply({'params': stack['cell']}, h, x_BLI)[0]
  signal_fn = lambda h, i: {
      'halt_logit': (h @ stack['halt_unit']['kernel'] + stack['halt_unit']['bias'])[..., 0],
      'exit_logits': step_cell.head_logits(head, h)}
  h_out, ref = halting_lib.drive(spec.policy, jnp.zeros((x.shape[0], 1, 16)), block_fn,
                                 signal_fn)
  np.testing.assert_allclose(np.asarray(logits),
                             np.asarray(step_cell.head_logits(head, h_out)), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux['exit_step']), np.asarray(ref['exit_step']))
  np.testing.assert_array_equal(np.asarray(aux['layers']), np.asarray(ref['num_layers']))
  assert len(np.unique(np.asarray(aux['exit_step']))) > 1  # rows really halt apart
