"""Weight-only quantisation of the base projections (QLoRA-style storage).

A quantised projection is two arrays: its values (int8 or int4) and `<name>_scale` in the
compute dtype. Symmetric absmax: int8 keeps one scale per output channel, int4 one per
group of up to 128 consecutive inputs along the last input axis (finer groups keep 4 bits
usable). Weights are quantised on the host before placement, so the device only ever holds
the small format; the forward dequantises one layer at a time inside its scan.

Shapes carry a leading layers axis on the host (`quantize`) and not inside the scan
(`dequantize`); `n_in` counts a projection's input axes (2 for `o`: heads x head_dim).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tpu_reason import choices

QMAX = {"int8": 127, "int4": 7}
DTYPES = {"int8": np.dtype(jnp.int8), "int4": np.dtype(jnp.int4)}
assert ("none", *DTYPES) == choices.QUANT == ("none", *QMAX), "choices.QUANT names these formats (model.quant)"
GROUP = 128


def group_size(mode: str, size: int) -> int:
  """Inputs sharing one scale along the grouped axis: all of them (int8), else the largest divisor <= GROUP."""
  if mode == "int8":
    return size
  return max(d for d in range(1, min(GROUP, size) + 1) if size % d == 0)


def scale_shape(mode: str, shape: tuple[int, ...], n_in: int) -> tuple[int, ...]:
  """Scales of a [layers, *inputs, *outputs] weight: int8 drops every input axis to 1, int4 groups the last."""
  if mode == "int8":
    return (shape[0], *([1] * n_in), *shape[1 + n_in:])
  last = shape[n_in]
  return (*shape[:n_in], last // group_size(mode, last), *shape[1 + n_in:])


def quantize(w: np.ndarray, mode: str, n_in: int) -> tuple[np.ndarray, np.ndarray]:
  """(values, scales) of a [layers, *inputs, *outputs] host array, one layer at a time (bounded host memory)."""
  values = np.empty(w.shape, DTYPES[mode])
  scales = np.empty(scale_shape(mode, w.shape, n_in), np.float32)
  for i in range(w.shape[0]):
    values[i], scales[i] = _quantize_layer(np.asarray(w[i], np.float32), mode, n_in)
  return values, scales


def _quantize_layer(w: np.ndarray, mode: str, n_in: int) -> tuple[np.ndarray, np.ndarray]:
  k = n_in - 1  # the grouped axis
  g = group_size(mode, w.shape[k])
  if mode == "int8":
    grouped, reduce = w, tuple(range(n_in))
  else:
    grouped, reduce = w.reshape(*w.shape[:k], w.shape[k] // g, g, *w.shape[k + 1:]), (k + 1,)
  amax = np.abs(grouped).max(axis=reduce, keepdims=True)
  scale = np.where(amax > 0, amax / QMAX[mode], 1.0).astype(np.float32)
  values = np.clip(np.rint(grouped / scale), -QMAX[mode], QMAX[mode]).reshape(w.shape)
  scale = scale if mode == "int8" else scale.squeeze(k + 1)
  return values.astype(DTYPES[mode]), scale


def dequantize(values, scale, n_in: int, dtype):
  """One layer's weight back in `dtype` (inside the scan: no layers axis)."""
  k = n_in - 1
  groups = scale.shape[k]
  if groups == 1:  # one scale per output channel (and per kept input axis): plain broadcast
    return values.astype(dtype) * scale.astype(dtype)
  shape = values.shape
  grouped = values.reshape(*shape[:k], groups, shape[k] // groups, *shape[k + 1:]).astype(dtype)
  return (grouped * jnp.expand_dims(scale.astype(dtype), k + 1)).reshape(shape)
