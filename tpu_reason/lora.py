"""LoRA adapters as their own pytree: only these get gradients, optimizer state, checkpoints.

Adapters are applied inside the forward (`transformer.project`), so the base weights are
never copied; `lora=None` is the base model (the GRPO reference policy). A model with added
tokens (`model.add_tokens`) also trains their embedding rows (and untied head columns) here,
as deltas under `tokens/`: the optimizer, sharding, checkpoints and resume carry them as they do
the adapters.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason.config import LoraCfg
from tpu_reason.errors import UserError
from tpu_reason.models.transformer import ModelConfig, Params
from tpu_reason.tree import unflatten

# projection -> (input dims, output dims) as logical axis names
_IO = {
    "q": (("embed",), ("heads", "head_dim")),
    "k": (("embed",), ("kv_heads", "head_dim")),
    "v": (("embed",), ("kv_heads", "head_dim")),
    "o": (("heads", "head_dim"), ("embed",)),
    "gate": (("embed",), ("mlp",)),
    "up": (("embed",), ("mlp",)),
    "down": (("mlp",), ("embed",)),
}


def _dims(cfg: ModelConfig) -> dict[str, int]:
  return {"embed": cfg.embed_dim, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "mlp": cfg.hidden_dim}


def targets(lora_cfg: LoraCfg) -> list[str]:
  """Projection names selected by the `targets` regex (full match)."""
  pattern = re.compile(lora_cfg.targets)
  names = [n for n in _IO if pattern.fullmatch(n)]
  if not names:
    raise UserError(f"lora.targets={lora_cfg.targets!r} matches no projection of {list(_IO)}")
  return names


def shapes(cfg: ModelConfig, lora_cfg: LoraCfg) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Flat name -> (shape, logical axes) for every adapter matrix."""
  d, r, L = _dims(cfg), lora_cfg.rank, cfg.num_layers
  out = {}
  for name in targets(lora_cfg):
    ins, outs = _IO[name]
    out[f"layers/{name}/a"] = ((L, *(d[a] for a in ins), r), ("layers", *ins, "lora"))
    out[f"layers/{name}/b"] = ((L, r, *(d[a] for a in outs)), ("layers", "lora", *outs))
  n = len(cfg.new_tokens)
  if n:  # "lora" on the token axis: never sharded (n is a handful), the model dim sharded like the embedding's
    out["tokens/embed"] = ((n, d["embed"]), ("lora", "embed"))
    if not cfg.tie_embeddings:
      out["tokens/head"] = ((d["embed"], n), ("embed", "lora"))
  return out


def init(cfg: ModelConfig, lora_cfg: LoraCfg, key: jax.Array, dtype=jnp.float32) -> Params:
  """A ~ N(0, 1/fan_in), B = 0 and token deltas 0: the adapted model starts exactly at the base model."""
  flat = {}
  for i, (name, (shape, _)) in enumerate(sorted(shapes(cfg, lora_cfg).items())):
    if name.endswith("/a"):
      fan_in = math.prod(shape[1:-1])
      flat[name] = jax.random.normal(jax.random.fold_in(key, i), shape, dtype) / math.sqrt(fan_in)
    else:
      flat[name] = jnp.zeros(shape, dtype)
  return unflatten(flat)


def scale(lora_cfg: LoraCfg) -> float:
  return lora_cfg.alpha / lora_cfg.rank


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def describe(params: Params, lora: Params) -> str:
  """'trainable N of M (x%)' where M counts base + adapters."""
  n, base = count(lora), count(params)
  return f"trainable {n:,} of {n + base:,} ({100 * n / (n + base):.2f}%)"


def merge(params: Params, lora: Params, lora_scale: float, new_tokens: tuple[int, ...] = ()) -> Params:
  """Host base weights with scale * A @ B folded in (export, a GRPO run's init), and the token deltas
  (unscaled: they are the rows themselves, not a low-rank update) added at rows `new_tokens`.

  In numpy on the host: merged jax arrays would land whole on the default device (chip 0 of a TPU).
  """
  params = _merge_tokens(params, lora.get("tokens", {}), new_tokens)
  layers = dict(params["layers"])
  for name, ab in lora["layers"].items():
    a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
    r = a.shape[-1]
    delta = a.reshape(a.shape[0], -1, r) @ b.reshape(b.shape[0], r, -1)  # batched over layers: BLAS
    w = np.asarray(layers[name])
    layers[name] = (w + lora_scale * delta.reshape(w.shape)).astype(w.dtype)
  return {**params, "layers": layers}


def _merge_tokens(params: Params, tokens: Params, ids: tuple[int, ...]) -> Params:
  """`params` with the added tokens' deltas on their embedding rows and (untied) head columns."""
  if not tokens:
    return params
  if len(ids) != tokens["embed"].shape[0]:
    raise UserError(f"the adapter trained {tokens['embed'].shape[0]} added token rows but the model has "
                    f"{len(ids)} (model.add_tokens must match the run that trained it)")
  ids = list(ids)  # distinct: a plain indexed add is exact
  embed = np.array(params["embed"])  # a copy: the caller's params stay as they were
  embed[ids] += np.asarray(tokens["embed"], embed.dtype)
  out = {**params, "embed": embed}
  if "head" in tokens:
    head = np.array(params["lm_head"])
    head[:, ids] += np.asarray(tokens["head"], head.dtype)
    out["lm_head"] = head
  return out
