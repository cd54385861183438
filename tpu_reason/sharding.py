"""The one table mapping logical axes to mesh axes, and the shardings, layouts and placements it gives.

It stands below the models, the losses and the sampler, which pin their layouts by logical axes through it
(`constrain`, `gathered`), and takes from the package only `tree`; `mesh` builds the meshes it is applied to.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from tpu_reason.tree import unflatten

MESH_AXES = ("fsdp", "tp")

# Logical axis -> mesh axis, for parameters and activations alike. Params are sharded over
# fsdp on the model dim (ZeRO-3 style) and over tp on heads / mlp / vocab. Activations keep
# the model dim whole ("act_embed") and put their rows on fsdp, so each chip computes only
# its own rows and FSDP gathers a layer's *weights*, never another chip's activations.
SHARDING_RULES: dict[str, str | None] = {
    "batch": "fsdp",
    "embed": "fsdp",
    "act_embed": None,
    "vocab": "tp",
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "lora": None,
    "seq": None,
}

# The decode layout (`sampling.layout`): the same table with the model dim whole. A decode step reads every
# weight for a few rows, so weights split over fsdp would be all-gathered for every generated token; whole over
# fsdp, each chip decodes its own rows on its own copy (pure data parallel), still split over tp.
DECODE_RULES: dict[str, str | None] = {**SHARDING_RULES, "embed": None}


def spec(shape: tuple[int, ...], axes: tuple[str, ...], mesh: Mesh, rules: dict = SHARDING_RULES) -> PartitionSpec:
  """PartitionSpec from logical axes; a dim the mesh axis doesn't divide stays replicated."""
  out, used = [], set()
  for dim, axis in zip(shape, axes):
    mesh_axis = rules[axis]
    if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
      out.append(None)
    else:
      out.append(mesh_axis)
      used.add(mesh_axis)
  return PartitionSpec(*out)


def shard_shape(shape: tuple[int, ...], axes: tuple[str, ...], mesh: Mesh | AbstractMesh,
                rules: dict = SHARDING_RULES) -> tuple[int, ...]:
  """The block of a `shape` array that one device holds under the table (`rules`)."""
  return tuple(d // (1 if a is None else mesh.shape[a]) for d, a in zip(shape, spec(shape, axes, mesh, rules)))


def shardings(table: dict[str, tuple[tuple[int, ...], tuple[str, ...]]], mesh: Mesh, rules: dict = SHARDING_RULES):
  """Nested pytree of NamedShardings for a flat {name: (shape, axes)} table."""
  return unflatten({k: NamedSharding(mesh, spec(s, a, mesh, rules)) for k, (s, a) in table.items()})


def rows_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Rows over fsdp when it divides them (else replicated), everything else replicated."""
  return NamedSharding(mesh, spec(shape, ("batch",) + ("seq",) * (len(shape) - 1), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def constrain(x, axes: tuple[str, ...]):
  """Pin `x`'s layout by logical axes under the context mesh (`jax.set_mesh`); a no-op without one."""
  m = jax.sharding.get_abstract_mesh()
  if m.empty or not set(MESH_AXES) <= set(m.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, spec(x.shape, axes, m))


def gathered(axes: tuple[str, ...]) -> tuple[str, ...]:
  """The same logical axes with the model dim whole: a layer's weights as its matmuls read them."""
  return tuple("act_embed" if a == "embed" else a for a in axes)


def place(tree, shard_tree, dtype=None):
  """Host arrays -> sharded device arrays, each device handed only its own block.

  The cast to `dtype` happens on the host (ml_dtypes for bfloat16), so no device ever holds
  a whole array it does not own: a 7B model never lands on chip 0 before being sharded.
  """
  def one(x, sharding):
    host = np.asarray(x) if dtype is None else np.asarray(x, dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree, shard_tree)


def bytes_per_device(tree) -> int:
  """Largest per-device footprint of a sharded pytree (for memory plans and tests)."""
  per_device: dict = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + math.prod(s.data.shape) * x.dtype.itemsize
  return max(per_device.values(), default=0)
