"""MoEFFN under a device mesh equals the single-device layer (outputs and grads, 1e-5).

Runs in a subprocess because the 8 fake CPU devices must be requested through XLA_FLAGS before
jax is imported. Parameters are sharded by their logical names (LOGICAL_RULES), inputs on
'data'; meshes (data, fsdp, expert, model) = (8,1,1,1), (2,1,4,1), (1,1,8,1), (2,1,2,2),
(1,2,2,2) (the last with the expert weights' d_model split over fsdp too).

`moe.dispatch=ragged` under a mesh is expert-parallel (act_jax/model/moe/expert_parallel.py):
XLA:CPU has no ragged-all-to-all, so here it runs the padded all-to-all transport, whose
buffers and program after the exchange are the TPU form's. Its outputs and gradients equal
the single-device 'gather' path (1e-5) with drops (capacity 1.0 and 0.5), halted tokens, the
dropless router, hash routing and stored int8 experts; tests/test_aot.py compiles the TPU
form and finds ragged-all-to-all in its HLO.
"""
HEADER = r'''
import os
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +  # before jax import
                           ' --xla_force_host_platform_device_count=8')
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import time
from jax.sharding import PartitionSpec as P

from act_jax import config as config_lib
from act_jax.scale import sharding
from act_jax.model.moe import MoEFFN

assert jax.device_count() == 8, jax.devices()
t0 = time.time()
B, L, D, F, E = 8, 8, 16, 32, 8
x = jax.random.normal(jax.random.key(0), (B, L, D))
run = jax.random.bernoulli(jax.random.key(1), 0.8, (B, L))
cot = jax.random.normal(jax.random.key(2), (B, L, D))

'''

CHILD = HEADER + r'''
CASES = [dict(router='top_k', shared_experts=1, priority='probability'),
         dict(router='expert_choice'),
         dict(router='soft', num_slots=2)]
for case in CASES:
  cfg = config_lib.moe_spec(**dict(num_experts=E, top_k=2, capacity_factor=1.0, **case))
  m = MoEFFN(cfg, d_model=D, d_ff=F, causal=False)
  boxed = jax.jit(m.init)(jax.random.key(3), x, run)['params']
  params = nn.meta.unbox(boxed)

  def loss(p, x, run):
    y, aux = m.apply({'params': p}, x, run)
    return jnp.sum(y * cot) + aux['lb_loss'] + aux['z_loss'], y

  step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (ref_l, ref_y), ref_g = jax.jit(step)(params, x, run)
  for shape in [(8, 1, 1, 1), (2, 1, 4, 1), (1, 1, 8, 1), (2, 1, 2, 2), (1, 2, 2, 2)]:
    mesh = sharding.make_mesh(shape=shape)
    p_sh = jax.device_put(params, sharding.params_shardings(boxed, mesh))
    if case['router'] != 'soft':
      assert p_sh['w_in'].sharding.spec == P('expert', 'fsdp', 'model'), p_sh['w_in'].sharding
    xs = jax.device_put(x, sharding.data_sharding(mesh, 3))
    rs = jax.device_put(run, sharding.data_sharding(mesh, 2))
    with sharding.mesh_context(mesh):
      (l, y), g = jax.jit(step)(p_sh, xs, rs)
    np.testing.assert_allclose(l, ref_l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, err_msg=f'{case} {shape}')
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5,
                                                         err_msg=f'{case} {shape}'), g, ref_g)
    print('ok', case, shape, round(time.time() - t0, 1), flush=True)

print('ALL OK')
'''

EP_CHILD = HEADER + r'''
# Expert-parallel ragged dispatch == single-device gather (routing, drops, combine, grads).
from act_jax.model import quant
from act_jax.model.moe import expert_parallel
EP_CASES = [dict(router='top_k', shared_experts=1), dict(router='top_k', top_k=1,
            capacity_factor=0.5), dict(router='dropless'), dict(router='hash', top_k=1)]
ids = jax.random.randint(jax.random.key(4), (B, L), 1, 250)
for case in EP_CASES:
  base = {**dict(num_experts=E, top_k=2, capacity_factor=1.0), **case}
  ref_m = MoEFFN(config_lib.moe_spec(**base), d_model=D, d_ff=F, causal=True)
  m = MoEFFN(config_lib.moe_spec(**dict(base, dispatch='ragged')), d_model=D, d_ff=F,
             causal=True)
  boxed = jax.jit(ref_m.init)(jax.random.key(3), x, run, ids)['params']
  params = nn.meta.unbox(boxed)

  def grads(mod):
    def loss(p, x, run):
      y, aux = mod.apply({'params': p}, x, run, ids)
      return jnp.sum(y * cot) + aux['lb_loss'] + aux['z_loss'], y
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  (ref_l, ref_y), ref_g = jax.jit(grads(ref_m))(params, x, run)
  for shape in [(2, 1, 4, 1), (1, 1, 8, 1), (2, 1, 2, 2), (1, 2, 2, 2), (8, 1, 1, 1)]:
    mesh = sharding.make_mesh(shape=shape)
    assert expert_parallel.transport_for(mesh) == 'padded'
    p_sh = jax.device_put(params, sharding.params_shardings(boxed, mesh))
    xs = jax.device_put(x, sharding.data_sharding(mesh, 3))
    rs = jax.device_put(run, sharding.data_sharding(mesh, 2))
    with sharding.mesh_context(mesh):
      f = jax.jit(grads(m))
      (l, y), g = f(p_sh, xs, rs)
      text = f.lower(p_sh, xs, rs).as_text()
    assert 'shard_map' in text or 'sdy.manual_computation' in text, shape
    assert shape[2] == 1 or 'all_to_all' in text, shape   # experts split: tokens travel
    np.testing.assert_allclose(y, ref_y, atol=1e-5, err_msg=f'ragged {case} {shape}')
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, atol=1e-5, err_msg=f'ragged {case} {shape}'), g, ref_g)
    print('ok ragged', case, shape, round(time.time() - t0, 1), flush=True)

# Stored int8 experts: the expert-parallel path reads the QArrays as the one-device one does.
import dataclasses
qspec = dataclasses.replace(quant.NO_QUANT, scheme='w8', stored=True)
cfg = config_lib.moe_spec(router='top_k', num_experts=E, top_k=2, capacity_factor=1.0,
                         dispatch='ragged')
qm = MoEFFN(cfg, d_model=D, d_ff=F, causal=True, quant=qspec)
fm = MoEFFN(cfg, d_model=D, d_ff=F, causal=True)
boxed = jax.jit(fm.init)(jax.random.key(3), x, run)['params']
qp = quant.quantize_params({'moe': nn.meta.unbox(boxed)}, qspec)['moe']
assert quant.is_quantized(qp['w_in'])
ref_y = jax.jit(lambda p: qm.apply({'params': p}, x, run)[0])(qp)
mesh = sharding.make_mesh(shape=(2, 1, 4, 1))
with sharding.mesh_context(mesh):
  y = jax.jit(lambda p, x, r: qm.apply({'params': p}, x, r)[0])(
      qp, jax.device_put(x, sharding.data_sharding(mesh, 3)),
      jax.device_put(run, sharding.data_sharding(mesh, 2)))
np.testing.assert_allclose(y, ref_y, atol=1e-5)
print('ok ragged int8', round(time.time() - t0, 1))
print('ALL OK')
'''


def test_moe_sharded_matches_single_device(multidevice):
  out = multidevice(CHILD, devices=8)   # conftest: fresh interpreter with 8 CPU devices
  assert 'ALL OK' in out, out


def test_expert_parallel_ragged_matches_single_device_gather(multidevice):
  out = multidevice(EP_CHILD, devices=8)
  assert 'ALL OK' in out and 'ok ragged int8' in out, out
