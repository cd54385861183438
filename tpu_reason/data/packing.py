"""`data.pack`: several examples laid end to end in rows of one width L = P + max_completion_tokens
(attention stays within each example); `batch.collate_packed` stacks the rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tpu_reason.data.examples import Example
from tpu_reason.errors import UserError
from tpu_reason.padding import right_pad


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
