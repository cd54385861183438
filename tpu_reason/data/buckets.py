"""Records -> fixed-shape token examples -> deterministic, resumable batches.

Every example is rendered through the model's chat template with the tag
schema's primer opening the assistant turn, then padded to static shapes:

  prompt      LEFT-padded to P = max_prompt_tokens (so generation starts at P)
  completion  RIGHT-padded to C = the smallest completion bucket that fits
              (buckets are `completion_buckets` plus max_completion_tokens)

A row that does not fit is dropped (`prompt_too_long` / `completion_too_long`),
never truncated, so every kept completion ends in the end-of-turn token and the
model learns to stop; so is a row whose rendered target would not parse back to
its answer (`target_unparseable`). A batch holds rows of one bucket only:

  prompt_tokens_BxP      int32   pad, ..., pad, prompt ids
  prompt_mask_BxP        bool    True on prompt ids
  completion_tokens_BxC  int32   completion ids, EOS, pad, ..., pad
  completion_mask_BxC    bool    loss mask: completion ids incl. EOS, not padding
  example_mask_B         bool    False on filler rows (only with drop_remainder=False)
  answer, checkpoints, prompt_text, id   python lists of length B (for rewards)
  columns                 {column: list of length B}: `reward_columns`, what every reward gets

With `data.pack` the trainer lays several examples end to end in rows of one width
L = P + max_completion_tokens instead (`pack`; attention stays within each example):

  tokens_BxL, segments_BxL (0 on padding), positions_BxL
  target_at_BxC, completion_mask_BxC   where the completion tokens are: the loss reads only those

Batch order is a pure function of (bucket sizes, batch size, seed, epoch), so a
trainer resumes exactly by restarting `batches(..., start_step=k)`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tpu_reason.data.sources import Record
from tpu_reason.errors import UserError
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


# ---------------------------------------------------------------- render


def render(record: Record, model: Any, schema: TagSchema, system_prompt: str = "") -> tuple[str, str]:
  """(prompt text ending in the primer, completion text after the primer)."""
  prompt = model.chat_prompt(_messages(record, system_prompt), primer=schema.primer)
  target = schema.render_target(record.reasoning, record.answer)
  assert target.startswith(schema.primer), (schema.name, target[:40])
  return prompt, target[len(schema.primer) :]


def _messages(record: Record, system_prompt: str) -> list[dict]:
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  return messages + [{"role": "user", "content": record.prompt}]


def round_trips(record: Record, schema: TagSchema, completion_text: str) -> bool:
  """Whether the rendered target parses back, well formed, to the record's answer.

  A reasoning text containing the schema's markers (or a multi-line answer in a
  tagless schema) would otherwise teach a format the reward parser rejects.
  """
  parsed = schema.parse(schema.primer + completion_text)
  return parsed.well_formed and parsed.answer == record.answer.strip()


def tokenize(model: Any, prompt_text: str, completion_text: str, eot: int) -> tuple[list[int], list[int]]:
  """(prompt ids, completion ids + end-of-turn id `eot`), tokenized separately.

  Separately, not as one string: at generation time the model continues from
  exactly these prompt ids, so a merge across the boundary must not be learned.
  """
  prompt_ids = model.encode(prompt_text)
  completion_ids = model.tokenizer.encode(completion_text, add_special_tokens=False)
  return prompt_ids, completion_ids + [eot]


def completion_buckets(max_completion_tokens: int, buckets: Sequence[int] = ()) -> tuple[int, ...]:
  """Sorted bucket lengths; the largest is always max_completion_tokens."""
  return tuple(sorted({int(b) for b in buckets if 0 < b <= max_completion_tokens} | {max_completion_tokens}))


def pick_bucket(length: int, buckets: Sequence[int]) -> int | None:
  """Smallest bucket >= length (buckets sorted), or None if none fits."""
  return next((b for b in buckets if length <= b), None)


def left_pad(ids: Sequence[int], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_L, mask_L) with ids flush right."""
  tokens = np.full(length, pad, np.int32)
  mask = np.zeros(length, bool)
  if ids:
    tokens[-len(ids) :] = ids
    mask[-len(ids) :] = True
  return tokens, mask


def right_pad(ids: Sequence[int], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_L, mask_L) with ids flush left."""
  tokens = np.full(length, pad, np.int32)
  mask = np.zeros(length, bool)
  tokens[: len(ids)] = ids
  mask[: len(ids)] = True
  return tokens, mask


# ---------------------------------------------------------------- report


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


# ---------------------------------------------------------------- examples


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
    prompt_text = model.chat_prompt(_messages(record, system_prompt), primer=schema.primer)
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


# ---------------------------------------------------------------- batching


def group_by_bucket(examples: Sequence[Example]) -> dict[int, list[Example]]:
  """{bucket: examples in their original order}, buckets ascending."""
  groups = collections.defaultdict(list)
  for ex in examples:
    groups[ex.bucket].append(ex)
  return dict(sorted(groups.items()))


def batch_order(
  n_per_bucket: Mapping[int, int],
  batch_size: int,
  seed: int,
  epoch: int,
  *,
  shuffle: bool = True,
  drop_remainder: bool = True,
) -> list[tuple[int, np.ndarray]]:
  """One epoch as [(bucket, example indices within the bucket)], a pure function.

  Rows are shuffled within each bucket, cut into batches, and the batches of all
  buckets are shuffled together; the (seed, epoch) rng makes each epoch differ
  while any epoch can be recomputed from scratch on resume.
  """
  rng = np.random.default_rng([seed, epoch])
  order = []
  for bucket in sorted(n_per_bucket):
    n = n_per_bucket[bucket]
    idx = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    order += [(bucket, idx[i : i + batch_size]) for i in range(0, stop, batch_size)]
  if shuffle:
    order = [order[i] for i in rng.permutation(len(order))]
  return order


def steps_per_epoch(n_per_bucket: Mapping[int, int], batch_size: int, drop_remainder: bool = True) -> int:
  """Batches per epoch (what `batch_order` returns the length of)."""
  if drop_remainder:
    return sum(n // batch_size for n in n_per_bucket.values())
  return sum(-(-n // batch_size) for n in n_per_bucket.values())


def _filled(rows: Sequence, batch_size: int) -> tuple[list, np.ndarray]:
  """(rows + copies of the first up to `batch_size`, example_mask_B: False on the copies).

  Copies of a real row (not all-pad rows) keep attention well defined; the collators clear
  their completion mask so they add no loss.
  """
  return list(rows) + [rows[0]] * (batch_size - len(rows)), np.arange(batch_size) < len(rows)


def reward_columns(rows: Sequence[Example]) -> dict[str, list]:
  """{column: one value per row}, what every reward gets as keyword lists: each extra column of the data
  (None in a row without it), then `answer` and `checkpoints`. The one place rows become reward columns."""
  names = dict.fromkeys(k for r in rows for k in r.columns)
  return {**{k: [r.columns.get(k) for r in rows] for k in names},
          "answer": [r.answer for r in rows], "checkpoints": [list(r.checkpoints) for r in rows]}


def collate(rows: Sequence[Example], batch_size: int) -> dict[str, Any]:
  """Stacks rows into one batch; short batches are filled with masked-out copies."""
  rows, example_mask_B = _filled(rows, batch_size)
  columns = reward_columns(rows)
  return {
    "prompt_tokens_BxP": np.stack([r.prompt_tokens_P for r in rows]),
    "prompt_mask_BxP": np.stack([r.prompt_mask_P for r in rows]),
    "completion_tokens_BxC": np.stack([r.completion_tokens_C for r in rows]),
    "completion_mask_BxC": np.stack([r.completion_mask_C for r in rows]) & example_mask_B[:, None],
    "example_mask_B": example_mask_B,
    "answer": columns["answer"],
    "checkpoints": columns["checkpoints"],
    "prompt_text": [r.prompt_text for r in rows],
    "id": [r.id for r in rows],
    "columns": columns,
  }


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRow:
  """Several examples laid end to end in one row of fixed width (see `pack`)."""

  ids: tuple[str, ...]
  tokens_L: np.ndarray  # int32: prompt, completion, prompt, completion, ..., pad
  segments_L: np.ndarray  # int32: 1, 1, ..., 2, 2, ..., 0 on padding
  positions_L: np.ndarray  # int32: restart at 0 in each segment
  target_at_C: np.ndarray  # int32: the row positions whose next token is a completion token (then 0s)
  completion_mask_C: np.ndarray  # bool: True on the used entries of target_at_C

  @property
  def bucket(self) -> int:  # one shape for every row: batches() groups by it
    return len(self.tokens_L)


def pack(examples: Sequence[Example], length: int, targets: int, pad: int, seed: int = 0) -> list[PackedRow]:
  """First-fit packing of each example's prompt + completion (unpadded) into rows of `length` tokens
  holding at most `targets` completion tokens (the loss reads only those: the vocabulary head runs on
  `targets` positions per row, as for an unpacked row of the widest bucket).

  A pure function of (examples, length, targets, seed): examples are visited in a seeded shuffle and
  each goes to the first row with room, so rows mix lengths and a resumed run rebuilds the same rows.
  """
  needs = [(ex.prompt_len + ex.completion_len, ex.completion_len) for ex in examples]
  for ex, (n, c) in zip(examples, needs):
    if n > length or c > targets:
      raise UserError(f"example {ex.id} has {n} tokens ({c} in its completion), more than a packed row holds "
                      f"({length}, {targets})")
  smallest = (min((n for n, _ in needs), default=0), min((c for _, c in needs), default=0))
  rows: list[list[Example]] = []
  room: dict[int, list[int]] = {}  # rows that can still take the smallest example: free tokens, free completion
  for i in np.random.default_rng([seed, length]).permutation(len(examples)):
    n, c = needs[i]
    slot = next((r for r, (free, free_c) in room.items() if free >= n and free_c >= c), None)
    if slot is None:
      slot = len(rows)
      rows.append([])
      room[slot] = [length, targets]
    rows[slot].append(examples[i])
    room[slot][0] -= n
    room[slot][1] -= c
    if room[slot][0] < smallest[0] or room[slot][1] < smallest[1]:
      del room[slot]  # full: dropping it keeps the scan short without changing where anything goes
  return [_packed_row(r, length, targets, pad) for r in rows]


def _packed_row(examples: Sequence[Example], length: int, targets: int, pad: int) -> PackedRow:
  tokens, segments, positions = np.full(length, pad, np.int32), np.zeros(length, np.int32), np.zeros(length, np.int32)
  target_at = []
  at = 0
  for seg, ex in enumerate(examples, start=1):
    ids = np.concatenate([ex.prompt_tokens_P[ex.prompt_mask_P], ex.completion_tokens_C[ex.completion_mask_C]])
    end = at + len(ids)
    tokens[at:end], segments[at:end], positions[at:end] = ids, seg, np.arange(len(ids))
    # the hidden state at t predicts token t + 1: from the prompt's last token to the one before EOS
    target_at += range(at + ex.prompt_len - 1, end - 1)
    at = end
  target_at_C, mask_C = right_pad(target_at, targets, 0)
  return PackedRow(tuple(ex.id for ex in examples), tokens, segments, positions, target_at_C, mask_C)


def collate_packed(rows: Sequence[PackedRow], batch_size: int) -> dict[str, Any]:
  """Stacks packed rows into one batch; short batches are filled with loss-free copies (as `collate`)."""
  rows, example_mask_B = _filled(rows, batch_size)
  return {
    "tokens_BxL": np.stack([r.tokens_L for r in rows]),
    "segments_BxL": np.stack([r.segments_L for r in rows]),
    "positions_BxL": np.stack([r.positions_L for r in rows]),
    "target_at_BxC": np.stack([r.target_at_C for r in rows]),
    "completion_mask_BxC": np.stack([r.completion_mask_C for r in rows]) & example_mask_B[:, None],
    "example_mask_B": example_mask_B,
    "id": [list(r.ids) for r in rows],
  }


def real_tokens(batch: Mapping[str, Any]) -> int:
  """Non-padding tokens of a batch in either layout."""
  if "segments_BxL" in batch:
    return int((batch["segments_BxL"] > 0).sum())
  return int(batch["prompt_mask_BxP"].sum() + batch["completion_mask_BxC"].sum())


def batches(
  examples: Sequence[Example] | Sequence[PackedRow],
  batch_size: int,
  *,
  seed: int = 0,
  start_step: int = 0,
  num_epochs: int | None = None,
  shuffle: bool = True,
  drop_remainder: bool = True,
) -> Iterator[dict[str, Any]]:
  """Batches from global step `start_step` on (forever if num_epochs is None).

  Step s is batch s % steps_per_epoch of epoch s // steps_per_epoch, so
  `batches(..., start_step=k)` yields exactly what the uninterrupted iterator
  yields after its first k batches.
  """
  if batch_size < 1:
    raise UserError(f"batch size must be >= 1, got {batch_size}")
  groups = group_by_bucket(examples)
  sizes = {b: len(g) for b, g in groups.items()}
  per_epoch = steps_per_epoch(sizes, batch_size, drop_remainder)
  stack = collate_packed if examples and isinstance(examples[0], PackedRow) else collate
  if per_epoch == 0:
    raise UserError(f"no full batch of {batch_size}: buckets hold {sizes or 'no examples'};"
                    " lower the batch size or add data")
  step = start_step
  while num_epochs is None or step < num_epochs * per_epoch:
    epoch, first = divmod(step, per_epoch)
    for bucket, idx in batch_order(sizes, batch_size, seed, epoch, shuffle=shuffle,
                                   drop_remainder=drop_remainder)[first:]:
      yield stack([groups[bucket][i] for i in idx], batch_size)
      step += 1
