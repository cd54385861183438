"""The curation report: where every input row went, per stage, reason and stratum; lengths; a PNG.

Accounting: the first stage sees every input row, each stage sees what the one
before kept, and every stage's rows are kept or dropped for exactly one reason,
so input rows = selected rows + all drops. `CurateReport.accounted` checks it
and the pipeline asserts it before writing anything.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from tpu_reason.data.report import histogram


@dataclasses.dataclass
class StageCount:
  """Rows one stage saw, kept, and dropped per reason."""

  name: str
  seen: int
  kept: int
  dropped: dict[str, int]

  @property
  def balanced(self) -> bool:
    return self.seen == self.kept + sum(self.dropped.values())


@dataclasses.dataclass
class CurateReport:
  """Everything `python -m tpu_reason.curate` measured; saved as report.json."""

  source: str
  input_rows: int
  target_size: int
  stages: list[StageCount]
  strata_field: str  # "domain" or "keywords"
  strata: dict[str, dict[str, int]]  # stratum -> {stage: rows left after it, "quota": rows asked for}
  baselines: list[dict]  # difficulty.BaselineStats as dicts
  lengths: dict[str, dict]  # "after_quality|curated" / "prompt|completion|..." -> length_summary
  ratio: dict  # stats.ratio_summary of the curated rows
  rows: list[dict]  # per curated row: id, stratum, token counts, reasoning:answer ratio, solved counts
  seconds: dict[str, float]
  outputs: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def selected(self) -> int:
    return self.stages[-1].kept if self.stages else 0

  @property
  def accounted(self) -> bool:
    """Every input row kept or dropped exactly once along the stage chain."""
    chain = all(b.seen == a.kept for a, b in zip(self.stages, self.stages[1:]))
    drops = sum(sum(s.dropped.values()) for s in self.stages)
    return (bool(self.stages) and self.stages[0].seen == self.input_rows and chain
            and all(s.balanced for s in self.stages) and self.input_rows == self.selected + drops)

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "selected": self.selected, "accounted": self.accounted}

  def save(self, path: str | pathlib.Path):
    pathlib.Path(path).write_text(json.dumps(self.to_json(), indent=1))

  def table(self) -> str:
    """The printed report: stages, strata, baselines, lengths."""
    lines = [f"source: {self.source}", "", f"{'stage':<12}{'seen':>7}{'kept':>7}  dropped"]
    for s in self.stages:
      drops = ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items()) if v) or "-"
      lines.append(f"{s.name:<12}{s.seen:>7}{s.kept:>7}  {drops}")
    drops = self.input_rows - self.selected
    ok = "adds up" if self.accounted else "DOES NOT ADD UP"
    lines.append(f"input rows {self.input_rows} = {self.selected} selected + {drops} dropped ({ok});"
                 f" target {self.target_size}")
    lines += ["", self._strata_table()]
    for b in self.baselines:
      lines.append(f"baseline {b['model']}: posed {b['posed']} (cached {b['cached']}, generated {b['generated']}),"
                   f" mean solve rate {b['mean_solve_rate']:.3f}, solved at least once {b['solved_any']},"
                   f" too easy {b['too_easy']}")
    for part in ("prompt", "completion"):
      summary = self.lengths.get(f"curated/{part}")
      if summary and summary["n"]:
        lines.append(histogram(summary["values"], summary["limit"], f"curated {part} tokens"))
    r = self.ratio
    if r.get("n"):
      lines.append(f"  reasoning:answer tokens (curated): median {r['median']:.1f}, p10 {r['p10']:.1f},"
                   f" p90 {r['p90']:.1f}; below 1:1 {r['below_1']} rows (no reasoning: {r['no_reasoning']})")
    return "\n".join(lines)

  def _strata_table(self) -> str:
    names = [s.name for s in self.stages]
    rates = {b["model"]: b["solve_rate_by_stratum"] for b in self.baselines}
    width = max([len(k) for k in self.strata] + [len(self.strata_field) + 9])
    head = f"{'stratum (' + self.strata_field + ')':<{width}}" + "".join(f"{n:>11}" for n in names)
    head += f"{'quota':>7}" + "".join(f"  solve:{m}" for m in rates)
    lines = [head]
    for key, counts in self.strata.items():
      row = f"{key:<{width}}" + "".join(f"{counts.get(n, 0):>11}" for n in names) + f"{counts.get('quota', 0):>7}"
      for m, by in rates.items():
        row += f"  {by[key]:>{6 + len(m)}.3f}" if key in by else f"  {'-':>{6 + len(m)}}"
      lines.append(row)
    return "\n".join(lines)


def length_summary(values: Sequence[int], limit: int) -> dict:
  """A length distribution for the JSON report (values kept: the PNG and histograms redraw from them)."""
  v = np.asarray(values, dtype=np.int64)
  if not len(v):
    return {"n": 0, "limit": limit, "values": []}
  return {"n": int(len(v)), "min": int(v.min()), "median": float(np.median(v)), "mean": float(v.mean()),
          "max": int(v.max()), "limit": limit, "values": v.tolist()}


def plot(report: CurateReport, path: str | pathlib.Path) -> pathlib.Path:
  """PNG: prompt / completion lengths (pool vs curated), reasoning:answer ratios, rows per stratum by stage."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
  for ax, part in zip(axes[0], ("prompt", "completion")):
    for split, color in (("after_quality", "0.7"), ("curated", "C0")):
      s = report.lengths.get(f"{split}/{part}", {})
      if s.get("n"):
        ax.hist(s["values"], bins=30, range=(0, max(s["limit"], s["max"])), color=color, alpha=0.8,
                label=f"{split.replace('_', ' ')} (n={s['n']})", density=True)
    limit = report.lengths.get(f"curated/{part}", {}).get("limit")
    if limit:
      ax.axvline(limit, color="C3", ls="--", lw=1, label=f"limit {limit}")
    ax.set_title(f"{part} tokens")
    ax.legend(fontsize=8)
  ratios = np.array([row["ratio"] for row in report.rows if row["reasoning_tokens"]])
  ax = axes[1][0]
  if len(ratios):
    ax.hist(ratios, bins=np.geomspace(min(ratios.min(), 0.5), max(ratios.max(), 2.0), 30), color="C2")
    ax.set_xscale("log")
    ax.axvline(1.0, color="C3", ls="--", lw=1, label="1:1")
    ax.legend(fontsize=8)
  without = len(report.rows) - len(ratios)
  ax.set_title(f"reasoning:answer tokens, curated rows ({without} without reasoning not shown)", fontsize=10)
  ax = axes[1][1]
  keys = list(report.strata)
  x = np.arange(len(keys))
  shown = [s.name for s in report.stages]
  for j, stage in enumerate(shown):
    ax.bar(x + (j - len(shown) / 2 + 0.5) * 0.8 / len(shown), [report.strata[k].get(stage, 0) for k in keys],
           width=0.8 / len(shown), label=stage)
  ax.set_xticks(x, keys, rotation=30, ha="right", fontsize=8)
  ax.set_title(f"rows per stratum ({report.strata_field}) after each stage")
  ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend
  ax.legend(fontsize=7, ncol=len(shown))
  fig.suptitle(f"curation: {report.input_rows} rows -> {report.selected} (target {report.target_size})")
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
