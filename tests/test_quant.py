"""Quantization (act_jax/model/quant.py, act_jax/quant/ptq.py): the numbers, the storage, the run.

Known answers computed by hand (absmax int8), error bounds per scheme, the stored-QArray model
equal to the float model on the dequantized weights on every expert dispatch path and in the
inference while-loop, gates bitwise untouched, QAT's straight-through gradient, auto bits
invariants, save / restore onto other meshes / export, and bad input refused by name.
"""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from act_jax import data as data_lib
from act_jax.deploy import export
from act_jax.infer import inference
from act_jax.quant import ptq
from act_jax.model import quant
from act_jax.train import training
from act_jax import config as config_lib
from act_jax.errors import CheckpointError, ConfigError
from act_jax.model.transformer import make_model
from act_jax.run import directory as run_lib
from experiments.configs import lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(scheme='none', stored=True, arg='', **over):
  """The runlocal LM (confidence exits, top-k MoE) with `arg` variants and section__field
  overrides, quantized with `scheme` (stored, or QAT with stored=False)."""
  c = lm.get_config('runlocal' + (',' + arg if arg else ''))
  for k, v in over.items():
    section, field = k.split('__')
    c[section][field] = v
  c.quant.update(scheme=scheme, stored=stored if scheme != 'none' else False)
  return config_lib.resolve(c, device_count=1)


def _init(spec):
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 250, (2, 32)), jnp.int32)
  v = jax.jit(make_model(spec).init)({'params': jax.random.key(1)}, tokens)
  return nn.unbox(v['params']), v.get('moe_state', {}), tokens


def _logits(spec, params, moe_state, tokens):
  """Full-depth logits (every token runs every layer: no exit decision can flip)."""
  fn = jax.jit(lambda p, m, t: make_model(spec).apply(
      {'params': p, 'moe_state': m}, t, threshold=inference.NEVER_EXIT)[0])
  return fn(params, moe_state, tokens)


# ----------------------------------------------------------------------------- numbers
def test_absmax_int8_known_answer():
  """Per output channel: s = max|W| / 127.5 (qwix's bound: qmax + 1/2), q = round(W / s)
  clipped to int8, W^ = s q. Computed by hand for two columns."""
  w = jnp.asarray([[1.0, 0.4], [-0.5, -0.2], [0.25, 0.1], [0.0, 0.05]], jnp.float32)
  q = quant.quantize_weight(('mlp', 'w_in'), w, 8, tile=0)  # contraction = axis 0
  # 1.0 / s = 127.5 rounds up and clips to 127; -0.5 / s = -63.75 -> -64; 0.25 -> 31.875 -> 32
  np.testing.assert_array_equal(np.asarray(q.qvalue), [[127, 127], [-64, -64], [32, 32],
                                                       [0, 16]])
  np.testing.assert_allclose(np.asarray(q.scale), [[1.0 / 127.5, 0.4 / 127.5]], rtol=1e-6)
  deq = np.asarray(qwix.dequantize(q))
  np.testing.assert_allclose(deq[:, 0], np.array([127, -64, 32, 0]) / 127.5, rtol=1e-6)
  assert np.all(np.abs(deq - np.asarray(w)) <= np.asarray(q.scale) / 2 + 1e-7)


@pytest.mark.parametrize('bits,tile,max_rel', [(8, 0, 0.01), (4, 0, 0.2), (4, 32, 0.15)])
def test_round_trip_error_bounds(bits, tile, max_rel):
  """|W - W^| <= s/2 entrywise for every scale layout; relative Frobenius error small (int8
  < 1 %, int4 < 20 %, tiles help); experts [N, E, D, F] get a scale per step, expert and
  output channel (and tile)."""
  w = jax.random.normal(jax.random.key(0), (2, 3, 64, 16)) * jnp.linspace(0.1, 3, 16)
  q = quant.quantize_weight(('stack', 'layer_1', 'moe', 'w_in'), w, bits, tile)
  assert q.qvalue.dtype == (jnp.int8 if bits == 8 else jnp.int4)
  assert q.scale.shape == (2, 3, 64 // tile if tile else 1, 16)
  deq = np.asarray(qwix.dequantize(q))
  s = np.repeat(np.asarray(q.scale), 64 // q.scale.shape[2], axis=2)
  err = np.abs(deq - np.asarray(w))
  assert np.all(err <= s / 2 + 1e-6)
  assert np.linalg.norm(err) / np.linalg.norm(np.asarray(w)) < max_rel
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  qv = np.asarray(q.qvalue).astype(np.int32)
  assert qv.min() >= lo and qv.max() <= hi


def test_mixed_member_bits_keep_each_members_grid():
  """auto: in one stacked expert tensor, 4-bit members equal a pure int4 quantization (own
  scales), 8-bit members a pure int8 one in the same (tiled) scale layout; int8 container."""
  path = ('stack', 'layer_1', 'moe', 'w_out')
  w = jax.random.normal(jax.random.key(3), (2, 2, 64, 8))
  bits = np.array([[8, 4], [4, 8]])
  q = quant.quantize_weight(path, w, bits, tile=32)
  q8 = qwix.quantize(w, jnp.int8, channelwise_axes=(0, 1, 3), tiled_axes={2: 32})
  q4 = qwix.quantize(w, jnp.int4, channelwise_axes=(0, 1, 3), tiled_axes={2: 32})
  assert q.qvalue.dtype == jnp.int8
  for n in range(2):
    for e in range(2):
      ref = q8 if bits[n, e] == 8 else q4
      np.testing.assert_array_equal(np.asarray(q.qvalue[n, e]).astype(int),
                                    np.asarray(ref.qvalue[n, e]).astype(int))
      np.testing.assert_array_equal(np.asarray(q.scale[n, e]), np.asarray(ref.scale[n, e]))
  assert np.abs(np.asarray(q.qvalue[0, 1]).astype(int)).max() <= 8


# ----------------------------------------------------------------------------- the model
@pytest.mark.parametrize('router,dispatch', [('top_k', 'gather'), ('top_k', 'ragged'),
                                             ('dropless', 'gather')])
def test_stored_weights_equal_float_model_on_dequantized_weights(router, dispatch):
  """The QArray model (qwix matmuls, expert gathers of QArrays) computes what the float model
  computes on the dequantized weights: every matmul site really reads the stored weights
  (batched experts -- also einsum dispatch and Soft MoE's --, ragged_dot, dropless blocks).
  Also through the inference while-loop (per-step dynamic slices of the QArrays)."""
  over = dict(moe__router=router, moe__dispatch=dispatch)
  spec_f, spec_q = _spec(**over), _spec('w4', **over)
  params, moe_state, tokens = _init(spec_f)
  qp = quant.quantize_params(params, spec_q.quant)
  assert any(quant.is_quantized(x) for x in jax.tree.leaves(qp, is_leaf=quant.is_quantized))
  ref = _logits(spec_f, quant.dequantize(qp), moe_state, tokens)
  got = _logits(spec_q, qp, moe_state, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-4, rtol=1e-4)
  if dispatch != 'gather' or router != 'top_k':
    return  # one while-loop compile is enough: the loop slices every QArray alike
  full = inference.OperatingPoint.full_depth()
  loop = jax.jit(lambda v, t: inference.forward_while(spec_q, v, t, full)[0])(
      {'params': qp, 'moe_state': moe_state}, tokens)
  np.testing.assert_allclose(np.asarray(loop), np.asarray(ref), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize('scheme,tol', [('w8', 0.02), ('w8a8', 0.03), ('w4', 0.3)])
def test_quantized_logits_within_tolerance_of_float(scheme, tol):
  """Random inputs, random init, dense FFNs, full depth: RMS(logits_q - logits_f) /
  RMS(logits_f) below a stated tolerance per scheme (measured 0.011 / 0.018 / 0.18; a wrong
  scale or grid gives O(1)). With experts, routing flips add to this (2 % of tokens change
  their top-1 expert at w8 here): what experiments.benchmark_quant reports."""
  spec_f = _spec(arg='router=none')
  params, moe_state, tokens = _init(spec_f)
  spec_q = _spec(scheme, arg='router=none')
  ref = _logits(spec_f, params, moe_state, tokens)
  got = _logits(spec_q, quant.quantize_params(params, spec_q.quant), moe_state, tokens)
  rel = float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.mean(ref ** 2)))
  assert 0 < rel < tol, rel


def test_gates_norms_embedding_untouched_by_default_and_quantized_in_the_ablation():
  params, _, _ = _init(_spec())
  keys, leaves, _ = quant._paths(params)
  for gates in (False, True):
    spec_q = _spec('w8', quant__gates=gates)
    qkeys, qleaves, _ = quant._paths(quant.quantize_params(params, spec_q.quant))
    assert qkeys == keys
    roles = {quant.role(k) for k in keys}
    assert {'gate', 'layer', 'expert', None} <= roles
    for k, a, b in zip(keys, leaves, qleaves):
      r = quant.role(k)
      if r in ('layer', 'expert'):
        assert quant.is_quantized(b), k
      elif r is None or not gates:
        assert not quant.is_quantized(b) and np.array_equal(np.asarray(a), np.asarray(b)), k
      else:  # ablation: gates rounded to the int8 grid, still stored float32
        assert b.dtype == jnp.float32 and not np.array_equal(np.asarray(a), np.asarray(b)), k
  spec_e = _spec('w8', quant__experts_only=True)
  for k, b in zip(keys, jax.tree.leaves(quant.quantize_params(params, spec_e.quant),
                                        is_leaf=quant.is_quantized)):
    assert quant.is_quantized(b) == (quant.role(k) == 'expert'), k


def test_every_matrix_has_a_role():
  """A new weight matrix must be classified (quantized or deliberately float): every
  parameter with two or more dims except the embedding lookup has a role, for every policy
  and router that adds parameters."""
  for arg, over in (('halting=act', {}), ('halting=learned_exit', {}), ('halting=mod', {}),
                    ('router=soft', {'model__causal': False}), ('', {'moe__shared_experts': 1}),
                    ('router=none', {})):
    spec = _spec(arg=arg, **over)
    shapes = jax.eval_shape(make_model(spec).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))  # shapes only: nothing compiles
    for k, x in zip(*quant._paths(nn.unbox(shapes['params']))[:2]):
      if x.ndim - 1 >= 2 and k != ('embedding',):  # minus the stacked step axis
        assert quant.role(k) is not None, (arg, over, k)


def test_qat_fake_quant_forward_and_straight_through_gradient():
  spec = _spec('w4', stored=False)
  params, _, _ = _init(spec)
  fq = quant.fake_quant(params, spec.quant)
  stored = quant.dequantize(quant.quantize_params(params, _spec('w4').quant))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), fq, stored)
  w = params['stack']['layer_0']['mlp']['w_in']
  c = jax.random.normal(jax.random.key(5), w.shape)
  g = jax.grad(lambda w: jnp.sum(quant.fake_quant(
      {'stack': {'layer_0': {'mlp': {'w_in': w}}}}, spec.quant)['stack']['layer_0']['mlp']
      ['w_in'] * c))(w)
  np.testing.assert_allclose(np.asarray(g), np.asarray(c), rtol=1e-6)  # identity backward


# ----------------------------------------------------------------------------- the run
@pytest.fixture
def run(shared_runs):
  """The suite's shared run 'lm_qat_w8' (trained once per suite run, read only): a tiny run
  trained with QAT at w8 (confidence exits + top-k MoE); its checkpoint holds float master
  weights, which PTQ then quantizes like any float run's."""
  path = shared_runs.path('lm_qat_w8')
  assert np.isfinite(shared_runs.results('lm_qat_w8')['loss'])
  return path


def test_quantized_run_saves_restores_exports(run, tmp_path):
  out = str(tmp_path / 'w8')
  lines = []
  info = ptq.quantize_run(run, out, log=lines.append)  # the QAT run's own scheme: w8
  assert not any('WARNING' in ln for ln in lines), lines
  assert info['bytes']['expert'] < info['float_bytes']['expert'] / 3.5
  spec_f, state_f, _ = run_lib.load(run)
  spec_q, state_q, _ = run_lib.load(out)
  assert spec_q.quant.stored and spec_q.quant.scheme == 'w8'
  want = quant.quantize_params(state_f['params'], spec_q.quant)
  jax.tree.map(np.testing.assert_array_equal, state_q['params'], want)
  # export -> import: the same stored arrays (int4 too: see the w4 case below)
  export.export_run(out, str(tmp_path / 'x'), log=lambda s: None)
  export.import_run(str(tmp_path / 'x'), str(tmp_path / 'back'), log=lambda s: None)
  _, back, _ = run_lib.load(str(tmp_path / 'back'))
  jax.tree.map(np.testing.assert_array_equal, back['params'], state_q['params'])


def test_w4_export_keeps_int4(run, tmp_path):
  out = str(tmp_path / 'w4')
  lines = []
  ptq.quantize_run(run, out, 'w4', log=lines.append)
  assert any('trained quantization-aware with scheme=w8' in ln for ln in lines), lines
  m = export.export_run(out, str(tmp_path / 'x'), log=lambda s: None)
  assert 'int4' in {e['dtype'] for e in m['arrays'].values()}
  export.import_run(str(tmp_path / 'x'), str(tmp_path / 'back'), log=lambda s: None)
  _, a, _ = run_lib.load(out)
  _, b, _ = run_lib.load(str(tmp_path / 'back'))
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])


@pytest.mark.slow  # ~40 s (8 devices); default tier: test_training's float reshard restore
# and the quantized save / restore / export on one device below
def test_restore_onto_other_meshes(multidevice, tmp_path):
  """A quantized checkpoint written on one device restores onto sharded meshes (the scale's
  reduced axes replicated), bit for bit, and the sharded model gives the same logits."""
  out = multidevice(f'''
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from act_jax.run import checkpointing
    from act_jax import config as config_lib
    from act_jax.model import quant
    from act_jax.scale import sharding
    from act_jax.run import state as run_state
    from act_jax.train import training
    from act_jax.model.transformer import make_model
    from experiments.configs import lm
    c = lm.get_config('runlocal')
    c.model.num_heads = 4
    c.quant.update(scheme='w4', stored=True)
    c.mesh.update(data=1)
    spec1 = config_lib.resolve(c, device_count=1)
    tokens = jnp.asarray(np.random.RandomState(0).randint(1, 250, (4, 32)), jnp.int32)
    fspec = config_lib.resolve(lm.get_config('runlocal'), device_count=1)
    v = make_model(spec1).init({{'params': jax.random.key(1)}}, tokens)
    params = quant.quantize_params(nn.unbox(v['params']), spec1.quant)
    state = {{'step': jnp.int32(1), 'params': params, 'moe_state': v.get('moe_state', {{}})}}
    ck = checkpointing.Checkpointer({str(tmp_path)!r} + '/ck', async_save=False)
    ck.save(1, state); ck.wait()
    ref = make_model(spec1).apply({{'params': params, 'moe_state': state['moe_state']}}, tokens)[0]
    for shape in [(2, 1, 2, 2), (1, 4, 2, 1)]:
      c.mesh.update(data=shape[0], fsdp=shape[1], expert=shape[2], model=shape[3])
      spec = config_lib.resolve(c, device_count=8)
      mesh = sharding.make_mesh(spec.mesh.shape)
      abstract, _ = run_state.state_shardings(spec, mesh)
      got = ck.restore(1, abstract)
      w = got['params']['stack']['layer_1']['moe']['w_in']
      assert quant.is_quantized(w) and w.qvalue.sharding.mesh.shape == mesh.shape
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(state))
      with sharding.mesh_context(mesh):
        out = jax.jit(lambda p, t: make_model(spec).apply(
            {{'params': p, 'moe_state': got['moe_state']}}, t)[0])(got['params'], tokens)
      np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)
    print('OK')
  ''')
  assert 'OK' in out


def test_auto_bits_meet_the_budget_and_keep_the_most_sensitive(run):
  spec, state, _ = run_lib.load(run)
  batches = data_lib.make_dataset(spec.data, spec.seed).eval_batches(2)
  table, rows = ptq.choose_bits(spec, state['params'], state['moe_state'], batches, 6.0,
                                log=lambda s: None)
  units = {r['unit'] for r in rows}
  assert {'layer_0/attn', 'layer_0/mlp', 'layer_1/attn', 'layer_1/moe'} == units
  n, e = spec.model.num_steps, spec.moe.num_experts
  assert len(table['layer_1/moe']) == n * e and len(table['layer_0/mlp']) == n
  w = np.array([r['weights'] for r in rows])
  bits = np.array([r['bits'] for r in rows])
  assert (bits * w).sum() / w.sum() <= 6.0 + 1e-9            # the budget holds
  assert 4 in bits and 8 in bits
  cost = np.array([r['delta_loss'] / r['weights'] for r in rows])
  assert cost[bits == 8].min() >= cost[bits == 4].max()      # greedy order: cheapest demoted
  freqs = [r['frequency'] for r in rows if r['unit'] == 'layer_1/moe']
  np.testing.assert_allclose(sum(freqs), n, rtol=1e-5)       # per step, shares sum to 1
  # the quantized run stores the table; its weights take their members' grids
  qspec = ptq.quantized_spec(spec, 'auto', bits=quant.format_bits(table))
  qp = quant.quantize_params(state['params'], qspec.quant)
  b = quant.model_bytes(qp, qspec.quant)
  assert b['assigned'] <= b['total']


@pytest.mark.parametrize('measure', ['accuracy', 'consistency'])
def test_operating_point_check_warns_when_the_old_certificate_breaks(run, tmp_path, measure):
  """A calibration.json whose tolerance almost any change breaks: the check reports the drop
  at the old threshold vs float full depth (and, for consistency, the agreement with the float
  model's full-depth predictions), and warns exactly when the old tolerance is exceeded."""
  src = str(tmp_path / 'src')
  shutil.copytree(run, src)
  with open(os.path.join(src, 'calibration.json'), 'w') as f:
    json.dump({'chosen_threshold': 0.5, 'max_layers': None, 'tolerance': 1e-9,
               'measure': measure}, f)
  lines = []
  info = ptq.quantize_run(src, str(tmp_path / 'w4'), 'w4', recalibrate=False, num_batches=4,
                          log=lines.append)
  op = info['operating_point']
  assert op['threshold'] == 0.5 and 0 <= op['consistency_vs_float_full'] <= 1
  holds = (op['drop_at_threshold'] <= 1e-9 if measure == 'accuracy'
           else op['consistency_vs_float_full'] >= 1 - 1e-9)
  assert op['holds'] == holds
  assert any('no longer holds' in ln for ln in lines) == (not op['holds'])
  full = op['float_full_accuracy']
  np.testing.assert_allclose(op['drop_at_threshold'],
                             (full - op['quantized_accuracy_at_threshold']) / full)


def test_bad_input_is_refused_by_name(run, tmp_path):
  with pytest.raises(ConfigError, match=r"--scheme='w3'.*known: w8, w4, w8a8, auto"):
    ptq.quantize_run(run, str(tmp_path / 'a'), 'w3', log=lambda s: None)
  with pytest.raises(ConfigError, match='--budget_bits=3: below the minimum 4 bits'):
    ptq.quantize_run(run, str(tmp_path / 'a'), 'auto', budget_bits=3, log=lambda s: None)
  with pytest.raises(ConfigError, match='--scheme=auto needs --budget_bits'):
    ptq.quantize_run(run, str(tmp_path / 'a'), 'auto', log=lambda s: None)
  with pytest.raises(ConfigError, match='--budget_bits=9: above 8'):
    ptq.quantize_run(run, str(tmp_path / 'a'), 'auto', budget_bits=9, log=lambda s: None)
  shared = _spec(model__share_weights=True)
  with pytest.raises(ConfigError, match='--scheme=auto: model.share_weights=True'):
    ptq.check_args(shared, 'auto', False, 5.0, 32, 'RUN')
  with pytest.raises(ConfigError, match='--budget_bits=5: only with --scheme=auto'):
    ptq.quantize_run(run, str(tmp_path / 'a'), 'w8', budget_bits=5, log=lambda s: None)
  with pytest.raises(ConfigError, match='--out=.*must differ from --workdir'):
    ptq.quantize_run(run, run, 'w8', log=lambda s: None)
  q = str(tmp_path / 'q')
  ptq.quantize_run(run, q, 'w8', log=lambda s: None)
  with pytest.raises(CheckpointError, match='--out=.*already holds a checkpoint'):
    ptq.quantize_run(run, q, 'w4', log=lambda s: None)
  with pytest.raises(ConfigError, match=r"--workdir=.* is already quantized \(quant.scheme='w8'"):
    ptq.quantize_run(q, str(tmp_path / 'b'), 'w4', log=lambda s: None)
  with pytest.raises(ConfigError, match='quant.stored=True: this run holds quantized weights'):
    training.train_and_evaluate(config_lib.complete(json.load(open(q + '/config.json'))), q,
                                log=lambda s: None)
  c = lm.get_config('runlocal')
  c.quant.scheme = 'w8a8'
  with pytest.raises(ConfigError, match="quant.scheme='w8a8' cannot be trained"):
    config_lib.validate(c)
  c.quant.scheme = 'w9'
  with pytest.raises(ConfigError, match="quant.scheme='w9': unknown scheme; known: none, w8"):
    config_lib.validate(c)
  c.quant.update(scheme='w8', tile=-1)
  with pytest.raises(ConfigError, match='quant.tile=-1'):
    config_lib.validate(c)


def test_quantize_binary_one_error_line(run, tmp_path):
  p = subprocess.run([sys.executable, '-m', 'experiments.quantize', f'--workdir={run}',
                      f'--out={tmp_path}/o', '--scheme=int3'], cwd=REPO, capture_output=True,
                     text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  errs = [ln for ln in p.stderr.splitlines() if ln.startswith('error:')]
  assert p.returncode == 2 and len(errs) == 1 and errs[0].startswith(
      'error: --scheme=int3: must be one of w8, w4, w8a8, auto'), p.stderr


def test_a_killed_quantization_is_redone_not_reused(run, tmp_path):
  """OUT with an unfinished quant.json (the first thing quantize_run writes) and a partial
  checkpoint directory: the next run clears it and finishes; a finished OUT is refused."""
  out = tmp_path / 'q'
  (out / 'checkpoints' / '3.orbax-checkpoint-tmp-1').mkdir(parents=True)
  (out / 'quant.json').write_text(json.dumps({'complete': False}))
  info = ptq.quantize_run(run, str(out), 'w8', log=lambda s: None)
  assert info['complete'] and json.loads((out / 'quant.json').read_text())['complete']
  assert run_lib.load(str(out))[0].quant.stored


def test_auto_gives_shared_experts_their_own_unit():
  spec = _spec(moe__shared_experts=1)
  params, moe_state, _ = _init(spec)
  batch = data_lib.make_dataset(spec.data, spec.seed).eval_batches(1)
  table, rows = ptq.choose_bits(spec, params, moe_state, batch, 4.0, experts_only=True,
                                log=lambda s: None)
  n, e = spec.model.num_steps, spec.moe.num_experts
  assert set(table) == {'layer_1/moe', 'layer_1/shared'}  # experts only: no attn / mlp
  assert len(table['layer_1/moe']) == n * e and len(table['layer_1/shared']) == n
  assert all(b == 4 for bits in table.values() for b in bits)  # budget 4: everything int4
  qspec = ptq.quantized_spec(spec, 'auto', experts_only=True, bits=quant.format_bits(table))
  qp = quant.quantize_params(params, qspec.quant)
  assert qp['stack']['layer_1']['moe']['shared']['w_in'].qvalue.dtype == jnp.int4
  assert not quant.is_quantized(qp['stack']['layer_1']['attn']['wq'])
