"""Run metrics: metrics.jsonl (appended, survives crashes), TensorBoard events, PNG curves."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
  """Append-only metrics sink; `history` is re-read from disk so resumed runs plot whole."""

  def __init__(self, out_dir: Path):
    self.out_dir = Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.path = self.out_dir / "metrics.jsonl"
    self._tb = None
    try:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.out_dir / "tb"))
    except ImportError:  # TensorBoard is optional; jsonl always works
      pass

  def log(self, step: int, metrics: dict, split: str = "train"):
    row = {"step": int(step), "split": split, **{k: _num(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)

  def history(self) -> list[dict]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def plot(self, keys: list[tuple[str, str]], filename: str, title: str) -> Path | None:
    """One panel per (split, key); later rows for a step (after a resume) win."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = self.history()
    panels = [(s, k) for s, k in keys if any(r["split"] == s and k in r for r in rows)]
    if not panels:
      return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (split, key) in zip(axes[0], panels):
      points = {r["step"]: r[key] for r in rows if r["split"] == split and key in r}
      xs = sorted(points)
      ax.plot(xs, [points[x] for x in xs], marker="o" if len(xs) < 30 else None, ms=3)
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


def _num(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if isinstance(v, int) else f
