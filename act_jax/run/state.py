"""What a checkpoint holds: the train state's layout, abstract shapes and shardings.

A train state is {'step', 'params', 'opt_state', 'moe_state'}: params with logical-axis
names (sharded by scale/sharding.py's rules), the AdamW state of make_optimizer (no weight
decay on norm scales and biases), and the MoE router-bias state (DeepSeek-V3 aux-loss-free
balancing). A quantized run (quant.stored) keeps no optimiser state and holds qwix QArrays
where its weights are quantized. The training loop (train/) creates and updates states;
run/directory.py restores them; both take their layout from here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from act_jax import config as config_lib
from act_jax.model import quant as quant_lib
from act_jax.model.transformer import make_model
from act_jax.scale import sharding as sharding_lib
from act_jax.spec import TrainSpec

State = dict  # {'step', 'params', 'opt_state', 'moe_state'}


# ----------------------------------------------------------------------------- optimiser
def make_optimizer(tcfg: TrainSpec) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(
      0.0, tcfg.lr, tcfg.warmup_steps, max(tcfg.steps, tcfg.warmup_steps + 1),
      end_value=tcfg.lr * tcfg.min_lr_ratio)
  # No weight decay on norm scales and biases.
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda p, _: not any(getattr(k, 'key', '') in ('scale', 'bias', 'final_norm_scale')
                           for k in p), params)
  return optax.chain(
      optax.clip_by_global_norm(tcfg.clip_norm),
      optax.adamw(sched, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay,
                  mask=decay_mask))


# ----------------------------------------------------------------------------- losses
def init_state_boxed(config: Any, rng: jax.Array) -> State:
  """Params (with logical-axis boxes), optimiser and MoE bias state."""
  spec = config_lib.as_spec(config)
  model = make_model(spec, train=False)
  variables = model.init({'params': rng}, jnp.zeros((1, spec.data.seq_len), jnp.int32))
  params = variables['params']
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'opt_state': make_optimizer(spec.train).init(params),
          'moe_state': variables.get('moe_state', {})}


def state_shardings(config: Any, mesh) -> tuple[State, State]:
  """(abstract unboxed state, NamedSharding tree) for the current mesh. A quantized run
  (quant.stored) has no optimiser state, and QArrays where its weights are quantized."""
  spec = config_lib.as_spec(config)
  if spec.quant.stored:
    float_spec = dataclasses.replace(spec, quant=quant_lib.NO_QUANT)
    abstract, shardings = state_shardings(float_spec, mesh)
    abstract = {k: v for k, v in abstract.items() if k != 'opt_state'}
    abstract['params'] = quant_lib.abstract_params(abstract['params'], spec.quant)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return abstract, shardings
  boxed = jax.eval_shape(lambda r: init_state_boxed(spec, r), jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(boxed)
  specs = nn.logical_to_mesh(specs, sharding_lib.LOGICAL_RULES)
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                           is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  sharding_lib.check_divisible(abstract['params'])  # backstop to config._check_layout
  return abstract, shardings


def init_state(config: Any, mesh, shardings) -> State:
  # No ambient mesh here: flax's init-time constraints inside nn.scan see per-layer ranks;
  # out_shardings alone lays the fresh state out over the mesh.
  del mesh
  spec = config_lib.as_spec(config)
  fn = jax.jit(lambda r: nn.unbox(init_state_boxed(spec, r)), out_shardings=shardings)
  return fn(jax.random.PRNGKey(spec.seed))
