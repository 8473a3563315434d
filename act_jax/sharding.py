"""Device mesh and logical-axis sharding rules.

Every parameter and the main activations carry *logical* axis names; the single rule table
below maps them to the physical mesh axes ('data', 'expert', 'model'). Changing how a model
is laid out over devices means editing this table, not the model code.

Logical names: batch, length, embed, mlp, heads, kv, vocab, layers, expert, expert_group.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


MESH_AXES = ('data', 'expert', 'model')

# logical axis -> mesh axis (None = replicated). One table for the whole library.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Expert-parallel devices are data-parallel elsewhere, so moving tokens to their
    # experts is a true all-to-all instead of a broadcast + slice.
    ('batch', ('data', 'expert')),
    ('expert_group', 'data'),
    ('expert', 'expert'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('vocab', 'model'),
    ('embed', None),
    ('kv', None),
    ('length', None),
    ('layers', None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ('data','expert','model') mesh of the given shape (spec.mesh.shape)."""
  devs = list(devices) if devices is not None else jax.devices()
  n = int(np.prod(shape))
  return Mesh(np.asarray(devs[:n]).reshape(tuple(shape)), MESH_AXES)


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
  """Batch-leading arrays are split over the 'data' and 'expert' axes (see LOGICAL_RULES)."""
  return NamedSharding(mesh, P(('data', 'expert'), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
