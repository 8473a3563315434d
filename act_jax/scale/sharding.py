"""Device mesh and logical-axis sharding rules.

Every parameter and the main activations carry *logical* axis names; the single rule table
below maps them to the physical mesh axes ('data', 'fsdp', 'expert', 'model'). Changing how a
model is laid out over devices means editing this table, not the model code.

Logical names: batch, length, embed, mlp, heads, kv, vocab, layers, expert, expert_group.

Layouts, all from the one table (flax assigns rules in order; a mesh axis is used at most
once per array, so an earlier rule wins):
* data parallel ('data'): the batch is split, parameters replicated.
* FSDP / ZeRO-3 ('fsdp'): the batch is split AND every weight's d_model ('embed') dimension
  is split, so parameters, gradients and Adam moments take 1/fsdp of the memory per device.
  Activations name 'batch' before 'embed', so in them 'fsdp' goes to the batch and their
  d_model stays whole. Inside the depth scan, XLA all-gathers each layer's weight slice just
  before its matmul and reduce-scatters its gradient (the MaxText/t5x scheme): only one
  layer's full weights are live at a time.
* expert parallel ('expert'): experts are split; tokens are split over it too (the batch
  rule), so routing tokens to their experts is an all-to-all.
* tensor parallel ('model'): attention heads, FFN hidden units and the vocabulary are split
  (Megatron-style; all-reduces per layer).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from act_jax.errors import ConfigError


MESH_AXES = ('data', 'fsdp', 'expert', 'model')

# logical axis -> mesh axis (None = replicated). One table for the whole library.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Expert-parallel devices are data-parallel elsewhere, so moving tokens to their
    # experts is a true all-to-all instead of a broadcast + slice.
    ('batch', ('data', 'fsdp', 'expert')),
    ('expert_group', ('data', 'fsdp')),
    ('expert', 'expert'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('vocab', 'model'),
    # FSDP: a weight's d_model dim. Listed after 'batch', so activations keep d_model whole.
    ('embed', 'fsdp'),
    ('kv', None),
    ('length', None),
    ('layers', None),
)
BATCH_AXES = dict(LOGICAL_RULES)['batch']  # mesh axes a batch-leading array is split over


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ('data','fsdp','expert','model') mesh of the given shape (spec.mesh.shape).

  TPU devices (real or from a topology description) are placed by mesh_utils so that the
  inner axes ('model', then 'expert', 'fsdp') ride the fastest ICI links; CPU/GPU devices
  in order."""
  devs = list(devices) if devices is not None else jax.devices()
  n = int(np.prod(shape))
  devs = devs[:n]
  if devs and devs[0].platform == 'tpu':
    try:
      grid = mesh_utils.create_device_mesh(tuple(shape), devs, allow_split_physical_axes=True)
      return Mesh(grid, MESH_AXES)
    except (ValueError, NotImplementedError, AssertionError):
      pass  # shapes mesh_utils cannot map onto the torus: plain order still works
  return Mesh(np.asarray(devs).reshape(tuple(shape)), MESH_AXES)


@contextlib.contextmanager
def rules_context() -> Iterator[None]:
  """Activates LOGICAL_RULES for nn.with_logical_constraint inside traced code."""
  with nn.logical_axis_rules(LOGICAL_RULES):
    yield


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
  """The mesh as ambient context plus the logical rules (jax.set_mesh where it exists)."""
  ctx = jax.set_mesh(mesh) if hasattr(jax, 'set_mesh') else mesh
  with ctx, rules_context():
    yield


def logical_to_spec(names: Sequence[str | None]) -> P:
  return nn.logical_to_mesh_axes(tuple(names), LOGICAL_RULES)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh/rules context."""
  return nn.with_logical_constraint(x, tuple(names))


def params_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
  """NamedShardings for a (boxed) param tree produced by nn.with_logical_partitioning."""
  specs = nn.get_partition_spec(abstract_boxed)
  specs = nn.logical_to_mesh(specs, LOGICAL_RULES)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-leading arrays are split like logical 'batch' (see LOGICAL_RULES)."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def check_divisible(abstract: Any, what: str = 'parameter') -> None:
  """Every sharded dimension of every array divides by its mesh axes' size, or one
  ConfigError listing the offending arrays (before anything is compiled)."""
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    sh = getattr(leaf, 'sharding', None)
    if not isinstance(sh, NamedSharding):
      continue
    for dim, axes in zip(leaf.shape, sh.spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      size = int(np.prod([sh.mesh.shape[a] for a in axes])) if axes else 1
      if dim % size:
        name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
        problems.append(f'{name} {tuple(leaf.shape)}: dim {dim} over mesh {"*".join(axes)}'
                        f'={size}')
  if problems:
    raise ConfigError(f'{len(problems)} {what}(s) do not split evenly over the mesh (change '
                      f'mesh.* or the model sizes): ' + '; '.join(problems[:8]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
