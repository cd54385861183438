"""Where every row of a split went (kept, dropped and why) and how long the kept ones are."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class DataReport:
  """Where every row of one split went, and how long the kept ones are."""

  split: str
  source: str
  max_prompt_tokens: int
  buckets: tuple[int, ...]
  seen: int = 0
  kept: int = 0
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)
  prompt_lengths: list[int] = dataclasses.field(default_factory=list)  # every rendered row
  completion_lengths: list[int] = dataclasses.field(default_factory=list)  # incl. EOS
  per_bucket: dict[int, int] = dataclasses.field(default_factory=dict)

  def drop(self, reason: str, n: int = 1):
    """Counts n rows seen and dropped for `reason`."""
    if n:
      self.seen += n
      self.dropped[reason] = self.dropped.get(reason, 0) + n

  def absorb(self, dropped: Mapping[str, int]):
    """Adds rows an upstream stage (the source loader) already dropped."""
    for reason, n in dropped.items():
      self.drop(reason, n)

  @property
  def accounted(self) -> bool:
    return self.seen == self.kept + sum(self.dropped.values())

  def summary(self) -> str:
    drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
    buckets = ", ".join(f"C={b}: {self.per_bucket.get(b, 0)}" for b in self.buckets if b)
    return (f"{self.split} [{self.source}]: kept {self.kept}/{self.seen}"
            f" (dropped: {drops or 'none'})" + (f"; buckets {buckets}" if buckets else ""))

  def __str__(self) -> str:
    lines = [self.summary()]
    if self.prompt_lengths:
      lines.append(histogram(self.prompt_lengths, self.max_prompt_tokens, "prompt tokens"))
    if self.completion_lengths:
      lines.append(histogram(self.completion_lengths, self.buckets[-1], "completion tokens (incl. EOS)"))
    return "\n".join(lines)


def histogram(lengths: Sequence[int], limit: int, title: str, bins: int = 8, width: int = 32) -> str:
  """Compact text bar chart of `lengths`; bins span [0, max(limit, longest)]."""
  values = np.asarray(lengths)
  top = max(limit, int(values.max()))
  counts, edges = np.histogram(values, bins=bins, range=(0, top))
  over = int((values > limit).sum())
  head = (f"  {title}: n={len(values)} min={values.min()} median={int(np.median(values))}"
          f" max={values.max()} limit={limit}" + (f" over_limit={over}" if over else ""))
  lines = [head]
  scale = width / max(1, counts.max())
  for n, lo, hi in zip(counts, edges[:-1], edges[1:]):
    flag = " >limit" if lo >= limit else ""
    lines.append(f"    {int(lo):5d}-{int(hi):<5d} {'#' * int(np.ceil(n * scale)):<{width}} {n}{flag}")
  return "\n".join(lines)
