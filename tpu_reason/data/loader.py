"""Examples (or packed rows) -> deterministic, resumable batches of one bucket each.

Batch order is a pure function of (bucket sizes, batch size, seed, epoch), so a
trainer resumes exactly by restarting `batches(..., start_step=k)`.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from tpu_reason.data.batch import Collated, collate, collate_packed
from tpu_reason.data.examples import Example
from tpu_reason.data.packing import PackedRow
from tpu_reason.errors import UserError


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


def batches(
  examples: Sequence[Example] | Sequence[PackedRow],
  batch_size: int,
  *,
  seed: int = 0,
  start_step: int = 0,
  num_epochs: int | None = None,
  shuffle: bool = True,
  drop_remainder: bool = True,
) -> Iterator[Collated]:
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
