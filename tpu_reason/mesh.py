"""The device mesh and the one table mapping logical axes to mesh axes."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from tpu_reason.config import MeshCfg
from tpu_reason.errors import UserError

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


# Per-chip peak dense bf16 FLOP/s by jax's `device_kind` (vendor figures): the MFU denominator when
# mesh.peak_flops is 0. "cpu" is a 2-core AVX2 machine's f32 rate, measured here.
PEAK_FLOPS = {"TPU v4": 2.75e14, "TPU v5 lite": 1.97e14, "TPU v5": 4.59e14, "TPU v6 lite": 9.18e14, "cpu": 1.5e11}


def peak_flops(cfg: MeshCfg) -> float | None:
  """Per-device peak FLOP/s: mesh.peak_flops, else by the device kind (None: unknown, no MFU)."""
  return cfg.peak_flops or PEAK_FLOPS.get(jax.devices()[0].device_kind)


def mesh_shape(cfg: MeshCfg, n_devices: int) -> tuple[int, int]:
  """(fsdp, tp) sizes covering exactly `n_devices` (fsdp=-1 takes what tp leaves)."""
  fsdp = n_devices // cfg.tp if cfg.fsdp == -1 else cfg.fsdp
  if fsdp * cfg.tp != n_devices:
    raise UserError(f"mesh fsdp={cfg.fsdp} x tp={cfg.tp} does not cover the {n_devices} available devices")
  return fsdp, cfg.tp


def make_mesh(cfg: MeshCfg, devices=None) -> Mesh:
  """An (fsdp, tp) mesh over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(np.array(devices).reshape(mesh_shape(cfg, len(devices))), MESH_AXES)


def abstract_mesh(cfg: MeshCfg, n_devices: int) -> AbstractMesh:
  """The mesh `make_mesh` would build on `n_devices`, without needing the devices (memory plans)."""
  return AbstractMesh(mesh_shape(cfg, n_devices), MESH_AXES)


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
  from tpu_reason.tree import unflatten

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


def place_params(params, model_cfg, mesh: Mesh, dtype=None):
  """A model's base weights sharded by the table, cast (and quantised, `model_cfg.quant`) on the host,
  each device given its block."""
  from tpu_reason.models.transformer import param_dtypes, param_shapes, quantize_params
  from tpu_reason.tree import flatten, unflatten

  flat = flatten(quantize_params(params, model_cfg))
  dtypes = param_dtypes(model_cfg, dtype)
  host = unflatten({k: np.asarray(x) if dtypes[k] is None else np.asarray(x, dtypes[k]) for k, x in flat.items()})
  return place(host, shardings(param_shapes(model_cfg), mesh))



def bytes_per_device(tree) -> int:
  """Largest per-device footprint of a sharded pytree (for memory plans and tests)."""
  per_device: dict = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + math.prod(s.data.shape) * x.dtype.itemsize
  return max(per_device.values(), default=0)
