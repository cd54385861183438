"""Orbax checkpoints of the trainable state: LoRA, optimizer, step, RNG, data position, config.

Two managers: `last/` keeps the newest K, `best/` keeps the one with the best eval metric.
Orbax writes into a temporary directory and renames it when complete, so a crash during a
save leaves the previous checkpoint intact (and the half-written one is ignored).
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tpu_reason.errors import UserError, first_line


class Checkpoints:
  """Save / restore a state pytree plus a JSON sidecar (config, data position, metrics)."""

  def __init__(self, directory: Path, keep_last: int, best_metric: str | None = None, best_mode: str = "min"):
    directory = Path(directory).absolute()
    self.last = ocp.CheckpointManager(
        directory / "last", options=ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True,
                                                                 enable_async_checkpointing=False))
    self.best = None
    if best_metric is not None:
      self.best = ocp.CheckpointManager(
          directory / "best", options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode=best_mode,
              keep_checkpoints_without_metrics=False, enable_async_checkpointing=False))

  @staticmethod
  def _args(state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

  def save(self, step: int, state: Any, meta: dict):
    self.last.save(step, args=self._args(state, meta), force=True)

  def save_best(self, step: int, state: Any, meta: dict, metrics: dict):
    """Offer `step` for `best`; a step already offered keeps its first metrics (a run whose batches ran out at
    an eval step is evaluated again as finished: same adapters)."""
    if self.best is not None and step not in self.best.all_steps():
      self.best.save(step, args=self._args(state, meta), metrics=metrics, force=True)

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def best_step(self) -> int | None:
    return None if self.best is None else self.best.best_step()

  def restore(self, step: int, abstract_state: Any, which: str = "last") -> tuple[Any, dict]:
    """Restore `step` into the shapes / shardings of `abstract_state`."""
    mgr = self.last if which == "last" else self.best
    saved = sorted(mgr.all_steps())
    where = Path(mgr.directory) / str(step)
    if step not in saved:
      raise UserError(f"no checkpoint at step {step} in {where.parent} (saved steps: {saved or 'none'})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    with _unreadable(where, f"; train.resume=none starts afresh, train.resume=<step> picks another of {saved}"):
      out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self):
    for m in (self.last, self.best):
      if m is not None:
        m.wait_until_finished()
        m.close()


@contextlib.contextmanager
def _unreadable(where: str, hint: str = ""):
  """Read a checkpoint; a failure of any kind (orbax and tensorstore raise many) is one line naming `where`.

  A failed read leaves others in flight, whose callbacks find orbax's event loop already closed and print a
  stray 'Event loop is closed' traceback, during the read or just after it: stderr is held while reading
  (written out as it was when the read succeeds) and muted a moment longer when it fails."""
  held = io.StringIO()
  try:
    with contextlib.redirect_stderr(held):
      yield
  except Exception as e:
    with contextlib.redirect_stderr(io.StringIO()):
      time.sleep(1.0)
    raise UserError(f"{where}: checkpoint unreadable ({first_line(e)}){hint}") from None
  sys.stderr.write(held.getvalue())


def _steps(manager_dir: Path) -> list[int]:
  """Completed steps in a `last/` or `best/` directory (Orbax renames a step dir when done)."""
  if not manager_dir.is_dir():
    return []
  return sorted(int(p.name) for p in manager_dir.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def any_saved(run_dir: Path) -> bool:
  """Whether a run directory holds a completed checkpoint."""
  root = Path(run_dir) / "checkpoints"
  return any(_steps(root / which) for which in ("last", "best"))


def find_step(path: Path) -> Path | None:
  """The step directory `path` names: a run dir, its checkpoints/, best/ or last/ (best wins), or a step.

  None if `path` is none of these (e.g. a model directory).
  """
  path = Path(path)
  if path.name.isdigit() and (path / "state").is_dir():
    return path
  if path.name in ("best", "last"):
    steps = _steps(path)
    return path / str(steps[-1]) if steps else None
  root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  for which in ("best", "last"):
    steps = _steps(root / which)
    if steps:
      return root / which / str(steps[-1])
  return None


def lora_metadata(step_dir: Path) -> dict:
  """The saved state's tree metadata (shapes, no arrays) of one step, checked to hold a LoRA: a cheap check of a
  checkpoint before a model loads; a damaged or foreign step is one line."""
  step_dir = Path(step_dir).absolute()
  with _unreadable(str(step_dir)):  # a damaged or foreign step: its metadata does not read
    saved = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree
  if not isinstance(saved, dict) or "lora" not in saved:
    raise UserError(f"{step_dir}: the saved state has no 'lora' entry")
  return saved


def restore_lora(step_dir: Path) -> tuple[Any, dict]:
  """The LoRA pytree (host numpy) and JSON meta of one saved step, whatever else the state holds."""
  step_dir = Path(step_dir).absolute()
  saved = lora_metadata(step_dir)
  # Only the adapters, as numpy: no optimizer state, and no saved device layout to match.
  item = {"lora": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved["lora"])}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with _unreadable(str(step_dir)):
    state = ocp.PyTreeCheckpointer().restore(
        step_dir / "state", args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
  return state["lora"], meta
