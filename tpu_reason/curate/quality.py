"""Quality stage: drop malformed rows and (near-)duplicate questions, one reason per row.

Checks in order; the first that fails names the drop:
  no_answer            the gold answer normalises to nothing (`rewards.normalize_answer`)
  no_trace             the row has no reasoning (only with curate.require_trace)
  unparsable_trace     the rendered target does not parse back to its answer (stray tags), in the
                       training schema or in the <reasoning>/<answer> tags curated.jsonl is written in
  missing_checkpoints  the reasoning lacks one of the row's own checkpoints
  duplicate            same normalised question as an earlier row
  near_duplicate       Jaccard of question word 3-shingles >= threshold with an earlier kept row

The normalised question is `data.prepare.question_tokens` (case, spacing and punctuation
ignored, so "What is 2+2?" and "what is 2 + 2" are duplicates). Near-duplicate candidates
come from MinHash LSH (datasketch) and are confirmed by the exact Jaccard of the
shingle sets, so every reported pair really is above the threshold; LSH may
miss a pair just above it (its recall is high, not perfect).
"""

from __future__ import annotations

from collections.abc import Sequence

from tpu_reason.data.prepare import question_tokens
from tpu_reason.data.render import round_trips
from tpu_reason.data.sources import Record
from tpu_reason.rewards import checkpoint_fraction, normalize_answer
from tpu_reason.tags import TagSchema, get_schema

REASONS = ("no_answer", "no_trace", "unparsable_trace", "missing_checkpoints", "duplicate", "near_duplicate")
SHINGLE = 3  # words per shingle
NUM_PERM = 128  # MinHash permutations
OUTPUT_SCHEMA = get_schema("reasoning")  # the teacher JSONL layout of curated.jsonl


def shingles(tokens: Sequence[str], n: int = SHINGLE) -> frozenset[str]:
  """Word n-grams of `tokens`; a question shorter than n is one shingle."""
  if len(tokens) <= n:
    return frozenset({" ".join(tokens)})
  return frozenset(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
  return len(a & b) / len(a | b) if a or b else 1.0


def _round_trips(record: Record, schema: TagSchema) -> bool:
  target = schema.render_target(record.reasoning, record.answer)
  return round_trips(record, schema, target[len(schema.primer) :])


def malformed(record: Record, schema: TagSchema, require_trace: bool) -> str | None:
  """The first structural defect of a row, or None."""
  if not normalize_answer(record.answer):
    return "no_answer"
  if require_trace and not record.reasoning.strip():
    return "no_trace"
  if not all(_round_trips(record, s) for s in (schema, OUTPUT_SCHEMA)):
    return "unparsable_trace"
  if record.checkpoints and checkpoint_fraction(record.reasoning, record.checkpoints) < 1.0:
    return "missing_checkpoints"
  return None


class NearDuplicates:
  """Remembers kept questions; tells whether a new one is a (near-)duplicate of any."""

  def __init__(self, threshold: float):
    from datasketch import MinHashLSH

    self.threshold = threshold
    self.exact: set[tuple[str, ...]] = set()
    self.kept: list[frozenset[str]] = []
    self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)

  def check(self, question: str) -> str | None:
    """'duplicate', 'near_duplicate' or None; a None question is remembered."""
    from datasketch import MinHash

    tokens = question_tokens(question)
    if tokens in self.exact:
      return "duplicate"
    grams = shingles(tokens)
    minhash = MinHash(num_perm=NUM_PERM)
    minhash.update_batch([g.encode() for g in grams])
    if any(jaccard(grams, self.kept[i]) >= self.threshold for i in self.lsh.query(minhash)):
      return "near_duplicate"
    self.exact.add(tokens)
    self.lsh.insert(len(self.kept), minhash)
    self.kept.append(grams)
    return None


def verdicts(records: Sequence[Record], schema: TagSchema, *, require_trace: bool = False,
             near_dup_threshold: float = 0.8) -> list[str | None]:
  """Per row, in order: the drop reason, or None to keep (earlier rows win duplicates)."""
  seen = NearDuplicates(near_dup_threshold)
  return [malformed(r, schema, require_trace) or seen.check(r.prompt) for r in records]
