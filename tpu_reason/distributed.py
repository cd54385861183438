"""Multi-host runs: join `jax.distributed` when the environment says so; assemble global batches.

A single host (a Kaggle v5e-8, a laptop) needs nothing. On several hosts every process runs
the same program; it joins the run when either

  * `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` are set (any cluster, and the 2-process CPU test), or
  * `TPU_REASON_DISTRIBUTED=auto`, or a TPU VM lists several `TPU_WORKER_HOSTNAMES`:
    jax detects the rest (Cloud TPU pod slices, GKE, SLURM).

Every process builds the same deterministic batch order and hands jax only its own rows:
`global_batch` turns per-process rows into one array sharded over all hosts' devices.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from tpu_reason import sharding as sharding_lib
from tpu_reason.errors import UserError

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int:
  value = os.environ.get(name, "")
  if not value.isdigit():
    raise UserError(f"{ENV_ADDRESS} is set, so {name} must be a non-negative integer, got {value!r}")
  return int(value)


def wanted() -> str | None:
  """'explicit', 'auto' or None (single process), from the environment alone."""
  if os.environ.get(ENV_ADDRESS):
    return "explicit"
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if os.environ.get("TPU_REASON_DISTRIBUTED") == "auto" or len(hosts) > 1:
    return "auto"
  return None


def initialize() -> tuple[int, int]:
  """Join the multi-process run the environment describes (once); returns (process id, count)."""
  mode = wanted()
  if mode is not None and not jax.distributed.is_initialized():
    if mode == "explicit":
      count, pid = _env_int(ENV_COUNT), _env_int(ENV_ID)
      if pid >= count:
        raise UserError(f"{ENV_ID}={pid} must be below {ENV_COUNT}={count}")
      jax.distributed.initialize(os.environ[ENV_ADDRESS], count, pid)
    else:
      jax.distributed.initialize()
  return jax.process_index(), jax.process_count()


def is_main() -> bool:
  """Whether this process writes the run's files (every process computes; one writes)."""
  return jax.process_index() == 0


def barrier(name: str):
  """Every process waits here for the others (a no-op with one process): e.g. all have checked an output
  directory before the main process writes into it, so none reads it half-written."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(tree):
  """Whole numpy arrays on every process, gathered across hosts when an array spans several."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
  """The rows (leading axis) of a global array that this process's devices hold."""
  n = global_shape[0]
  blocks = sorted({b[0].indices(n)[:2] for b in sharding.addressable_devices_indices_map(global_shape).values()})
  if any(prev[1] != nxt[0] for prev, nxt in zip(blocks, blocks[1:])):
    raise ValueError(f"this process's devices hold rows {blocks}, not one contiguous range: order the mesh by host")
  return slice(blocks[0][0], blocks[-1][1])


def global_batch(arrays, mesh):
  """Global batch-sharded arrays from host arrays of the whole batch (any pytree of them: a dict, a
  `data.batch.Batch`), as the same tree; each process reads only its rows."""
  def one(full: np.ndarray) -> jax.Array:
    sharding = sharding_lib.rows_sharding(mesh, full.shape)
    local = full[process_rows(sharding, full.shape)]
    return jax.make_array_from_process_local_data(sharding, local, full.shape)

  return jax.tree.map(one, arrays)
