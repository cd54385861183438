"""The decode layout: the weights the sampler reads, merged and resharded once per rollout.

Training keeps the base weights split over `fsdp` on the model dim (ZeRO-3), and the forward pass
all-gathers each layer where its matmuls run. That suits a training step (thousands of tokens per
gather); a decode step reads every weight for a few rows, so under that layout every generated token
all-gathers the whole model (~1 GB per token per chip for Gemma-3-1B on a v5e-8), and applies each
LoRA adapter as two extra matmuls per projection per layer.

`build` makes instead, once per rollout (the adapters change only between rollouts), the decode
copy: the base with the LoRA folded in (W + scale·A·B, and the added tokens' rows), dequantised, in
the compute dtype, laid out by `sharding.DECODE_RULES`: whole over fsdp (each chip decodes its own rows on
its own copy: pure data parallel) and split over tp as in training. One all-gather per rollout instead
of one per token. `mesh.decode_layout`: merged | train | auto (merged when its copy fits beside what
the device already holds).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from tpu_reason import choices, sharding as sharding_lib
from tpu_reason.models import quant as quant_lib
from tpu_reason.models.transformer import ModelConfig, PROJECTIONS, n_inputs, param_dtypes, param_shapes
from tpu_reason.tree import flatten, unflatten

MODES = ("auto", "merged", "train")
assert MODES == choices.DECODE_LAYOUTS, "choices.DECODE_LAYOUTS names these (config validates mesh.decode_layout)"


@dataclasses.dataclass(frozen=True)
class Weights:
  """What `sampler.generate` reads: (params, lora, lora_scale) in one layout ("merged": lora is None)."""

  params: Any
  lora: Any
  lora_scale: float
  layout: str  # "merged" | "train"

  def kwargs(self) -> dict:
    return {"lora": self.lora, "lora_scale": self.lora_scale}


def merged_cfg(model_cfg: ModelConfig) -> ModelConfig:
  """The architecture of the decode copy: dense projections (a quantised base is widened once, here)."""
  return dataclasses.replace(model_cfg, quant="none")


def shardings(model_cfg: ModelConfig, mesh):
  """The decode copy's NamedShardings: the parameter table under `sharding.DECODE_RULES`."""
  return sharding_lib.shardings(param_shapes(merged_cfg(model_cfg)), mesh, sharding_lib.DECODE_RULES)


def bytes_per_device(model_cfg: ModelConfig, mesh, dtype) -> int:
  """Bytes of the decode copy on one device (`mesh` may be abstract: plans)."""
  table = param_shapes(merged_cfg(model_cfg))
  return sum(int(np.prod(sharding_lib.shard_shape(s, a, mesh, sharding_lib.DECODE_RULES))) * jnp.dtype(dtype).itemsize
             for s, a in table.values())


def cache_bytes(model_cfg: ModelConfig, rows: int, slots: int, dtype, mesh) -> int:
  """Bytes of a KV cache of `rows` x `slots` on one device: rows over fsdp, kv heads over tp (as the sampler's)."""
  per = sharding_lib.shard_shape((model_cfg.num_layers, rows, model_cfg.num_kv_heads, model_cfg.head_dim, slots),
                             ("layers", "batch", "kv_heads", "head_dim", "seq"), mesh)
  return 2 * int(np.prod(per)) * jnp.dtype(dtype).itemsize


def free_bytes(mesh) -> int | None:
  """HBM left on the fullest device of `mesh` (None where the backend does not say: CPU)."""
  stats = [d.memory_stats() for d in mesh.devices.flat if d.process_index == jax.process_index()]
  if any(s is None or "bytes_limit" not in s for s in stats):
    return None
  return min(s["bytes_limit"] - s["bytes_in_use"] for s in stats)


def choose(mode: str, need: int, free: int | None) -> tuple[str, str | None]:
  """(layout, a one-line note when auto falls back) for a decode copy of `need` bytes per device."""
  if mode != "auto":
    return mode, None
  if free is None or need <= free:
    return "merged", None
  gib = 2**30
  return "train", (f"note: the merged decode copy ({need / gib:.2f} GiB per device) does not fit beside the training "
                   f"state ({free / gib:.2f} GiB free): decoding on the training layout (weights all-gathered per "
                   "token; mesh.decode_layout=train silences this)")


def merge_layer_weights(params, lora, *, model_cfg: ModelConfig, lora_scale: float, dtype, layer_sharding=None):
  """Dense base weights with scale·A·B folded in (f32 sums, stored in `dtype`) and the added tokens' deltas
  on their rows: the model the adapters define, to run with lora=None.

  One layer at a time (`lax.map`): the f32 sums of a whole stack would be temporaries the size of the model
  in f32 (7.6 GiB a chip for Gemma-2-2B on fsdp 8), one layer's are a few MB. `layer_sharding` ({name: one
  layer's sharding}) lays each merged layer out as it is written: gathered one layer at a time, not as a whole
  stack in flight (6.6 GiB of temporaries for Gemma-2-2B, 16 GiB for Qwen2.5-7B)."""
  flat, dtypes = flatten(params), param_dtypes(merged_cfg(model_cfg), dtype)
  adapters = {} if lora is None else lora.get("layers", {})
  for p in PROJECTIONS:
    scale, ab = flat.pop(f"layers/{p}_scale", None), adapters.get(p)
    if scale is not None or ab is not None:
      one = functools.partial(_merge_one, n_in=n_inputs(p), lora_scale=lora_scale, dtype=dtypes[f"layers/{p}"],
                              sharding=None if layer_sharding is None else layer_sharding[p])
      flat[f"layers/{p}"] = jax.lax.map(one, (flat[f"layers/{p}"], scale, ab))
  tokens = {} if lora is None else lora.get("tokens", {})
  ids = jnp.asarray(model_cfg.new_tokens, jnp.int32)
  if "embed" in tokens:  # tied: the head reads these rows too
    rows = jnp.asarray(flat["embed"])[ids].astype(jnp.float32) + tokens["embed"].astype(jnp.float32)
    flat["embed"] = jnp.asarray(flat["embed"]).at[ids].set(rows.astype(flat["embed"].dtype))
  if "head" in tokens:
    cols = jnp.asarray(flat["lm_head"])[:, ids].astype(jnp.float32) + tokens["head"].astype(jnp.float32)
    flat["lm_head"] = jnp.asarray(flat["lm_head"]).at[:, ids].set(cols.astype(flat["lm_head"].dtype))
  return unflatten({k: jnp.asarray(v, dtypes[k]) for k, v in flat.items()})


def _merge_one(xs, *, n_in: int, lora_scale: float, dtype, sharding=None):
  """One layer's projection: widened from its quantised storage (if `scale`), plus scale·A·B (if adapted)."""
  w, scale, ab = xs
  w = w.astype(jnp.float32) if scale is None else quant_lib.dequantize(w, scale, n_in, jnp.float32)
  if ab is not None:
    a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
    r = a.shape[-1]
    w = w + lora_scale * (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(w.shape)
  return w.astype(dtype) if sharding is None else jax.lax.with_sharding_constraint(w.astype(dtype), sharding)


@functools.lru_cache(maxsize=8)
def merge_fn(model_cfg: ModelConfig, mesh, lora_scale: float, dtype):
  """The jitted merge for one model, mesh and scale: computed where training keeps each weight, written
  in the decode layout (the one all-gather of the rollout)."""
  table = param_shapes(merged_cfg(model_cfg))
  layer = {k.split("/")[1]: NamedSharding(mesh, sharding_lib.spec(s[1:], a[1:], mesh, sharding_lib.DECODE_RULES))
           for k, (s, a) in table.items() if k.split("/")[-1] in PROJECTIONS}
  merge = functools.partial(merge_layer_weights, model_cfg=model_cfg, lora_scale=lora_scale, dtype=dtype,
                            layer_sharding=layer)
  return jax.jit(merge, out_shardings=shardings(model_cfg, mesh))


def build(params, lora, model_cfg: ModelConfig, mesh, *, lora_scale: float, dtype, mode: str = "auto",
          extra_bytes: int = 0) -> tuple[Weights, str | None]:
  """The weights to decode with: (Weights, a note when auto fell back to the training layout).

  `extra_bytes` is what the rollout will allocate besides the copy (its KV cache): auto keeps room for it."""
  need = bytes_per_device(model_cfg, mesh, dtype)
  layout, note = choose(mode, need + extra_bytes, free_bytes(mesh) if mode == "auto" else None)
  if layout == "train":
    return Weights(params, lora, lora_scale, "train"), note
  merged = merge_fn(model_cfg, mesh, float(lora_scale), jnp.dtype(dtype))(params, lora)
  return Weights(merged, None, 1.0, "merged"), note

