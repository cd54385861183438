"""The batch a step trains on: typed device arrays (registered pytrees) and the host lists beside them.

The array field names are the one place the batch layout is spelled; their suffix is the shape:

  `Batch` (one bucket of examples, see `collate`)
    prompt_tokens_BxP      int32   pad, ..., pad, prompt ids
    prompt_mask_BxP        bool    True on prompt ids
    completion_tokens_BxC  int32   completion ids, EOS, pad, ..., pad
    completion_mask_BxC    bool    loss mask: completion ids incl. EOS, not padding

  `RolloutBatch(Batch)` (a GRPO update's rows) adds
    advantages_B, num_tokens_B             float32  per row (num_tokens_B: the token-mean's share)
    old_logp_BxC, ref_logp_BxC             float32  stored log-probs of the sampled tokens
    sampler_logp_BxC                       float32  the same tokens' log-probs as the sampler computed them

  `PackedBatch` (`data.pack`, see `packing.pack` and `collate_packed`): several examples per row of
  width L = P + max_completion_tokens, attention within each example
    tokens_BxL, segments_BxL (0 on padding), positions_BxL   int32
    target_at_BxC  int32, completion_mask_BxC  bool   where the completion tokens are: the loss reads only those

`Collated` is what the loader yields: one of those (`arrays`, what goes to the device) plus what stays
on the host, for rewards and logs:
  example_mask_B        bool    False on filler rows (only with drop_remainder=False)
  id, prompt_text, answer, checkpoints   python lists of length B
  columns               {column: list of length B}: `reward_columns`, what every reward gets
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  from tpu_reason.data.examples import Example
  from tpu_reason.data.packing import PackedRow


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class Batch:
  """Left-padded prompts + right-padded completions of one bucket (numpy on the host, jax on the device)."""

  prompt_tokens_BxP: Any
  prompt_mask_BxP: Any
  completion_tokens_BxC: Any
  completion_mask_BxC: Any

  @classmethod
  def spec(cls, rows: int, prompt: int, completion: int, sharding=None) -> Batch:
    """This layout as ShapeDtypeStructs (what `plan` lowers against)."""
    s = lambda n, dt: jax.ShapeDtypeStruct((rows, n), dt, sharding=sharding)
    return cls(s(prompt, jnp.int32), s(prompt, bool), s(completion, jnp.int32), s(completion, bool))

  def rows(self, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every array, as the same type."""
    return jax.tree.map(lambda x: x[start:stop], self)

  def tokens(self) -> Batch:
    """The token arrays alone (what scoring log-probs needs)."""
    return Batch(self.prompt_tokens_BxP, self.prompt_mask_BxP, self.completion_tokens_BxC, self.completion_mask_BxC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class RolloutBatch(Batch):
  """A GRPO batch: the sampled rollouts plus what the policy loss weighs them by."""

  advantages_B: Any = None
  num_tokens_B: Any = None  # the micro-slice's share of the mini-batch's tokens (dapo's token-mean)
  old_logp_BxC: Any = None
  ref_logp_BxC: Any = None
  sampler_logp_BxC: Any = None  # what the sampler's weights gave (the merged decode copy): rollout/logp_diff, tis

  @classmethod
  def spec(cls, rows: int, prompt: int, completion: int, sharding=None) -> RolloutBatch:
    per_row = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding)
    per_token = jax.ShapeDtypeStruct((rows, completion), jnp.float32, sharding=sharding)
    return cls(**vars(Batch.spec(rows, prompt, completion, sharding)), advantages_B=per_row, num_tokens_B=per_row,
               old_logp_BxC=per_token, ref_logp_BxC=per_token, sampler_logp_BxC=per_token)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class PackedBatch:
  """Rows of several examples end to end (`data.pack`)."""

  tokens_BxL: Any
  segments_BxL: Any
  positions_BxL: Any
  target_at_BxC: Any
  completion_mask_BxC: Any

  @classmethod
  def spec(cls, rows: int, prompt: int, completion: int, sharding=None) -> PackedBatch:
    """This layout as ShapeDtypeStructs: rows of prompt + completion tokens."""
    s = lambda n, dt: jax.ShapeDtypeStruct((rows, n), dt, sharding=sharding)
    width = prompt + completion
    return cls(s(width, jnp.int32), s(width, jnp.int32), s(width, jnp.int32), s(completion, jnp.int32),
               s(completion, bool))


@dataclasses.dataclass(frozen=True, eq=False)
class Collated:
  """One batch as the loader yields it: device arrays and the host lists beside them (not a pytree)."""

  arrays: Batch | PackedBatch
  example_mask_B: np.ndarray
  id: list  # packed: the ids of each row's examples
  prompt_text: list = dataclasses.field(default_factory=list)
  answer: list = dataclasses.field(default_factory=list)
  checkpoints: list = dataclasses.field(default_factory=list)
  columns: dict = dataclasses.field(default_factory=dict)


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


def collate(rows: Sequence[Example], batch_size: int) -> Collated:
  """Stacks rows into one batch; short batches are filled with masked-out copies."""
  rows, example_mask_B = _filled(rows, batch_size)
  columns = reward_columns(rows)
  arrays = Batch(
    prompt_tokens_BxP=np.stack([r.prompt_tokens_P for r in rows]),
    prompt_mask_BxP=np.stack([r.prompt_mask_P for r in rows]),
    completion_tokens_BxC=np.stack([r.completion_tokens_C for r in rows]),
    completion_mask_BxC=np.stack([r.completion_mask_C for r in rows]) & example_mask_B[:, None],
  )
  return Collated(arrays, example_mask_B, id=[r.id for r in rows], prompt_text=[r.prompt_text for r in rows],
                  answer=columns["answer"], checkpoints=columns["checkpoints"], columns=columns)


def collate_packed(rows: Sequence[PackedRow], batch_size: int) -> Collated:
  """Stacks packed rows into one batch; short batches are filled with loss-free copies (as `collate`)."""
  rows, example_mask_B = _filled(rows, batch_size)
  arrays = PackedBatch(
    tokens_BxL=np.stack([r.tokens_L for r in rows]),
    segments_BxL=np.stack([r.segments_L for r in rows]),
    positions_BxL=np.stack([r.positions_L for r in rows]),
    target_at_BxC=np.stack([r.target_at_C for r in rows]),
    completion_mask_BxC=np.stack([r.completion_mask_C for r in rows]) & example_mask_B[:, None],
  )
  return Collated(arrays, example_mask_B, id=[list(r.ids) for r in rows])


def real_tokens(arrays: Batch | PackedBatch) -> int:
  """Non-padding tokens of a batch in either layout."""
  if isinstance(arrays, PackedBatch):
    return int((arrays.segments_BxL > 0).sum())
  return int(arrays.prompt_mask_BxP.sum() + arrays.completion_mask_BxC.sum())
