"""MoEFFN under a device mesh equals the single-device layer (outputs and grads, 1e-5).

Runs in a subprocess because the 8 fake CPU devices must be requested through XLA_FLAGS before
jax is imported. Parameters are sharded by their logical names (LOGICAL_RULES), inputs on
'data'; meshes (data, fsdp, expert, model) = (8,1,1,1), (2,1,4,1), (1,1,8,1), (2,1,2,2),
(1,2,2,2) (the last with the expert weights' d_model split over fsdp too).
"""
CHILD = r'''
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


def test_moe_sharded_matches_single_device(multidevice):
  out = multidevice(CHILD, devices=8)   # conftest: fresh interpreter with 8 CPU devices
  assert 'ALL OK' in out, out
