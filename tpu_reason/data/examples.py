"""Records -> fixed-shape token examples (`Example`), or the reason a row was dropped.

Every example is rendered through the model's chat template with the tag
schema's primer opening the assistant turn, then padded to static shapes:

  prompt      LEFT-padded to P = max_prompt_tokens (so generation starts at P)
  completion  RIGHT-padded to C = the smallest completion bucket that fits
              (buckets are `completion_buckets` plus max_completion_tokens)

A row that does not fit is dropped (`prompt_too_long` / `completion_too_long`),
never truncated, so every kept completion ends in the end-of-turn token and the
model learns to stop; so is a row whose rendered target would not parse back to
its answer (`target_unparseable`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tpu_reason.data.render import messages, render, round_trips, tokenize
from tpu_reason.data.report import DataReport
from tpu_reason.data.sources import Record
from tpu_reason.padding import left_pad, right_pad
from tpu_reason.tags import TagSchema

# Why build_examples drops a row (source loaders add their own reasons).
DROP_REASONS = ("target_unparseable", "prompt_too_long", "completion_too_long")


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class Example:
  """One record as padded token arrays of static shape, plus reward metadata."""

  id: str
  prompt_text: str
  completion_text: str
  answer: str
  checkpoints: tuple[str, ...]
  domain: str
  prompt_tokens_P: np.ndarray  # int32, left-padded
  prompt_mask_P: np.ndarray  # bool
  completion_tokens_C: np.ndarray  # int32, right-padded, EOS last real token
  completion_mask_C: np.ndarray  # bool, loss mask
  columns: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the record's extra columns

  @property
  def bucket(self) -> int:
    return len(self.completion_tokens_C)

  @property
  def prompt_len(self) -> int:
    return int(self.prompt_mask_P.sum())

  @property
  def completion_len(self) -> int:
    return int(self.completion_mask_C.sum())


def completion_buckets(max_completion_tokens: int, buckets: Sequence[int] = ()) -> tuple[int, ...]:
  """Sorted bucket lengths; the largest is always max_completion_tokens."""
  return tuple(sorted({int(b) for b in buckets if 0 < b <= max_completion_tokens} | {max_completion_tokens}))


def pick_bucket(length: int, buckets: Sequence[int]) -> int | None:
  """Smallest bucket >= length (buckets sorted), or None if none fits."""
  return next((b for b in buckets if length <= b), None)


@dataclasses.dataclass(frozen=True)
class Fit:
  """What fitting one record gave: its Example, or why it was dropped, and its token lengths."""

  record: Record
  example: Example | None
  reason: str | None  # one of DROP_REASONS when example is None
  prompt_len: int | None = None  # None when the row never got tokenized
  completion_len: int | None = None  # incl. EOS


def fit_records(
  records: Iterable[Record],
  model: Any,
  schema: TagSchema,
  *,
  system_prompt: str = "",
  max_prompt_tokens: int = 256,
  max_completion_tokens: int = 512,
  buckets: Sequence[int] = (),
) -> Iterator[Fit]:
  """One `Fit` per record, in order: rendered, tokenized, padded, or dropped (never truncated)."""
  sizes = completion_buckets(max_completion_tokens, buckets)
  pad, eot = model.pad_id, model.end_of_turn_id
  for record in records:
    prompt_text, completion_text = render(record, model, schema, system_prompt)
    if not round_trips(record, schema, completion_text):
      yield Fit(record, None, "target_unparseable")
      continue
    prompt_ids, completion_ids = tokenize(model, prompt_text, completion_text, eot)
    lengths = (len(prompt_ids), len(completion_ids))
    bucket = pick_bucket(len(completion_ids), sizes)
    if len(prompt_ids) > max_prompt_tokens:
      yield Fit(record, None, "prompt_too_long", *lengths)
    elif bucket is None:
      yield Fit(record, None, "completion_too_long", *lengths)
    else:
      p_tokens, p_mask = left_pad(prompt_ids, max_prompt_tokens, pad)
      c_tokens, c_mask = right_pad(completion_ids, bucket, pad)
      example = Example(record.id, prompt_text, completion_text, record.answer, tuple(record.checkpoints),
                        record.domain, p_tokens, p_mask, c_tokens, c_mask, record.columns)
      yield Fit(record, example, None, *lengths)


def build_examples(
  records: Iterable[Record],
  model: Any,
  schema: TagSchema,
  *,
  system_prompt: str = "",
  max_prompt_tokens: int = 256,
  max_completion_tokens: int = 512,
  buckets: Sequence[int] = (),
  split: str = "train",
  source: str = "",
) -> tuple[list[Example], DataReport]:
  """Render, tokenize and pad records; overlong rows are dropped and counted."""
  sizes = completion_buckets(max_completion_tokens, buckets)
  report = DataReport(split, source, max_prompt_tokens, sizes)
  examples = []
  for fit in fit_records(records, model, schema, system_prompt=system_prompt, max_prompt_tokens=max_prompt_tokens,
                         max_completion_tokens=max_completion_tokens, buckets=buckets):
    if fit.prompt_len is not None:
      report.prompt_lengths.append(fit.prompt_len)
      report.completion_lengths.append(fit.completion_len)
    if fit.example is None:
      report.drop(fit.reason)
      continue
    examples.append(fit.example)
    report.seen += 1
    report.kept += 1
    report.per_bucket[fit.example.bucket] = report.per_bucket.get(fit.example.bucket, 0) + 1
  return examples, report


def build_prompts(
  records: Iterable[Record],
  model: Any,
  schema: TagSchema,
  *,
  system_prompt: str = "",
  max_prompt_tokens: int = 256,
  split: str = "train",
  source: str = "",
) -> tuple[list[Example], DataReport]:
  """Prompt-only examples (empty completion arrays) for RL: no reference trace is needed."""
  pad = model.pad_id
  report = DataReport(split, source, max_prompt_tokens, (0,))
  examples = []
  for record in records:
    prompt_text = model.chat_prompt(messages(record, system_prompt), primer=schema.primer)
    prompt_ids = model.encode(prompt_text)
    report.prompt_lengths.append(len(prompt_ids))
    if len(prompt_ids) > max_prompt_tokens:
      report.drop("prompt_too_long")
      continue
    p_tokens, p_mask = left_pad(prompt_ids, max_prompt_tokens, pad)
    empty = np.zeros(0, np.int32)
    examples.append(Example(record.id, prompt_text, "", record.answer, tuple(record.checkpoints), record.domain,
                            p_tokens, p_mask, empty, empty.astype(bool), record.columns))
    report.seen += 1
    report.kept += 1
    report.per_bucket[0] = report.per_bucket.get(0, 0) + 1
  return examples, report
