"""The device mesh: a `MeshCfg` -> an (fsdp, tp) `Mesh` (or its abstract twin for plans), and the chips' peak FLOP/s.
The logical-axis table laid over it lives in `sharding`."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh

from tpu_reason.config import MeshCfg
from tpu_reason.errors import UserError
from tpu_reason.sharding import MESH_AXES

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
