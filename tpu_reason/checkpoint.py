"""Orbax checkpoints of the trainable state: LoRA, optimizer, step, RNG, data position, config.

Two managers: `last/` keeps the newest K, `best/` keeps the one with the best eval metric.
Orbax writes into a temporary directory and renames it when complete, so a crash during a
save leaves the previous checkpoint intact (and the half-written one is ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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
    if self.best is not None:
      self.best.save(step, args=self._args(state, meta), metrics=metrics, force=True)

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def best_step(self) -> int | None:
    return None if self.best is None else self.best.best_step()

  def restore(self, step: int, abstract_state: Any, which: str = "last") -> tuple[Any, dict]:
    """Restore `step` into the shapes / shardings of `abstract_state`."""
    mgr = self.last if which == "last" else self.best
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self):
    for m in (self.last, self.best):
      if m is not None:
        m.wait_until_finished()
        m.close()
