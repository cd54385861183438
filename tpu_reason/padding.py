"""Token rows of a fixed width: ids flush right (prompts, so generation continues from the last column) or flush
left (completions), with the mask of the real tokens. numpy only: the data pipeline and the sampler both pad here."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
