"""Trace statistics: reasoning-to-answer token ratios and ROUGE-L against reference reasoning.

The ratio is reasoning tokens / answer tokens per row. Rows whose reasoning is
shorter than their answer (ratio < 1, incl. rows with no reasoning at all) teach
a model to answer without thinking; a set of uniformly long traces teaches it to
ramble: both are failure modes that balancing the data prevents, so reports show
the whole distribution, not just a mean.

ROUGE-L (longest-common-subsequence F-measure, `rouge-score`'s implementation)
compares a model's generated reasoning with the reference trace of the same row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tpu_reason.tags import TagSchema


@dataclasses.dataclass(frozen=True)
class TraceLengths:
  """Token counts of one row's reasoning and answer."""

  reasoning: int
  answer: int

  @property
  def ratio(self) -> float:
    """Reasoning tokens per answer token (answers are never empty, so never a division by 0)."""
    return self.reasoning / max(self.answer, 1)


def trace_lengths(tokenizer: Any, pairs: Iterable[tuple[str, str]]) -> list[TraceLengths]:
  """TraceLengths of each (reasoning, answer) text pair, tokenized without special tokens."""
  def count(text: str) -> int:
    return len(tokenizer.encode(text.strip(), add_special_tokens=False)) if text.strip() else 0

  return [TraceLengths(count(r), count(a)) for r, a in pairs]


def completion_parts(schema: TagSchema, completion_text: str) -> tuple[str, str]:
  """(reasoning, answer) of a rendered completion (the text after the primer)."""
  parsed = schema.parse(schema.primer + completion_text)
  return parsed.reasoning or "", parsed.answer or ""


def ratio_summary(lengths: Sequence[TraceLengths]) -> dict[str, float | int]:
  """Distribution of reasoning:answer ratios and how many rows fall below 1:1."""
  if not lengths:
    return {"n": 0}
  ratios = np.array([t.ratio for t in lengths])
  p10, median, p90 = np.percentile(ratios, [10, 50, 90])
  return {
    "n": len(lengths),
    "min": float(ratios.min()),
    "p10": float(p10),
    "median": float(median),
    "mean": float(ratios.mean()),
    "p90": float(p90),
    "max": float(ratios.max()),
    "below_1": int((ratios < 1).sum()),
    "no_reasoning": sum(t.reasoning == 0 for t in lengths),
  }


def format_ratio_summary(summary: dict, title: str = "reasoning:answer tokens") -> str:
  """One line for a printed report."""
  if not summary.get("n"):
    return f"  {title}: no rows"
  return (f"  {title}: n={summary['n']} min={summary['min']:.1f} p10={summary['p10']:.1f}"
          f" median={summary['median']:.1f} p90={summary['p90']:.1f} max={summary['max']:.1f};"
          f" below 1:1 {summary['below_1']} rows (no reasoning: {summary['no_reasoning']})")


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
  """ROUGE-L F-measure of each prediction against its reference."""
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(["rougeL"])
  return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def reasoning_rouge_l(schema: TagSchema, generated: Sequence[str], references: Sequence[str]) -> list[float | None]:
  """ROUGE-L of each generated text's reasoning block vs the reference reasoning (None without a reference)."""
  scores: list[float | None] = [None] * len(references)
  rows = [i for i, ref in enumerate(references) if ref.strip()]
  predicted = [schema.parse(generated[i]).reasoning or "" for i in rows]
  for i, score in zip(rows, rouge_l(predicted, [references[i] for i in rows])):
    scores[i] = score
  return scores
