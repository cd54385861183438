"""Run metrics: metrics.jsonl (appended, survives crashes), TensorBoard events, PNG curves."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import jax
import numpy as np


class MetricsLog:
  """Append-only metrics sink; `history` is re-read from disk so resumed runs plot whole.

  `write=False` (every process but the first of a multi-host run) logs and plots nothing.
  """

  def __init__(self, out_dir: Path, write: bool = True):
    self.out_dir = Path(out_dir)
    self.path = self.out_dir / "metrics.jsonl"
    self.write = write
    self._tb = None
    if not write:
      return
    self.out_dir.mkdir(parents=True, exist_ok=True)
    try:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.out_dir / "tb"))
    except ImportError:  # TensorBoard is optional; jsonl always works
      pass

  def log(self, step: int, metrics: dict, split: str = "train"):
    if not self.write:
      return
    row = {"step": int(step), "split": split, **{k: _num(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)

  def truncate(self, step: int):
    """Drop the rows logged after `step`, which a resumed run logs again (all of them for a fresh start)."""
    if not self.write or not self.path.exists():
      return
    rows = self.history()
    kept = [r for r in rows if r["step"] <= step] if step else []
    if len(kept) < len(rows):
      self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  def history(self) -> list[dict]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def plot(self, keys: list[tuple[str, str]], filename: str, title: str, per_row: int = 4) -> Path | None:
    """One panel per (split, key), `per_row` to a row; later rows for a step (after a resume) win.

    Noisy series (10+ points) get a moving average over a tenth of the run drawn on top.
    """
    if not self.write:
      return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = self.history()
    panels = [(s, k) for s, k in keys if any(r["split"] == s and k in r for r in rows)]
    if not panels:
      return None
    ncols = min(per_row, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
      ax.set_visible(False)
    for ax, (split, key) in zip(axes.flat, panels):
      points = {r["step"]: r[key] for r in rows if r["split"] == split and key in r}
      xs = sorted(points)
      ys = np.asarray([points[x] for x in xs], float)
      ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, alpha=0.45 if len(xs) >= 10 else 1.0)
      if len(xs) >= 10:
        w = max(2, len(xs) // 10)
        ax.plot(xs[w - 1:], np.convolve(ys, np.ones(w) / w, mode="valid"), lw=2, label=f"mean of {w}")
        ax.legend(fontsize=7, loc="best")
      ax.set_title(f"{split} {key}")
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = self.out_dir / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _num(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if isinstance(v, int) else f


class CompileCount:
  """Programs XLA built while a `compiles()` block is open: backend compiles, or loads from jax's persistent
  compilation cache where one is set (not jit-cache hits)."""

  n = 0


@contextlib.contextmanager
def compiles():
  """Counts the XLA programs compiled inside the block: a step of a shape seen before compiles none."""
  count = CompileCount()

  def listen(event, duration, **kwargs):
    if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"):
      count.n += 1

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
