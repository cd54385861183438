"""Map Hugging Face tensor names and layouts ([out, in] matrices) onto our params."""

from __future__ import annotations

from typing import Callable

import numpy as np

from tpu_reason.models.transformer import ModelConfig, param_shapes
from tpu_reason.tree import flatten, unflatten

# our flat name -> HF name pattern ({i} = layer index)
HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers/attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers/q": "model.layers.{i}.self_attn.q_proj.weight",
    "layers/k": "model.layers.{i}.self_attn.k_proj.weight",
    "layers/v": "model.layers.{i}.self_attn.v_proj.weight",
    "layers/o": "model.layers.{i}.self_attn.o_proj.weight",
    "layers/q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers/k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers/v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers/q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers/k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "layers/gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers/up": "model.layers.{i}.mlp.up_proj.weight",
    "layers/down": "model.layers.{i}.mlp.down_proj.weight",
}
# Llama/Qwen have one norm after attention (HF calls it post_attention_layernorm and
# it feeds the MLP); Gemma2/3 have a norm on each side of both sublayers.
LLAMA_NORMS = {"layers/ffn_norm": "model.layers.{i}.post_attention_layernorm.weight"}
GEMMA_NORMS = {
    "layers/ffn_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "layers/post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers/post_ffn_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}


def hf_names(cfg: ModelConfig) -> dict[str, str]:
  """Our flat param name -> HF tensor name pattern, for this architecture."""
  norms = GEMMA_NORMS if cfg.family.startswith("gemma") else LLAMA_NORMS
  table = {**HF_NAMES, **norms}
  return {name: table[name] for name in param_shapes(cfg)}


def _to_ours(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """One HF tensor (torch layout) -> our layout."""
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  leaf = name.split("/")[-1]
  if leaf == "q":
    return w.T.reshape(d, n, h)
  if leaf in ("k", "v"):
    return w.T.reshape(d, k, h)
  if leaf == "o":
    return w.T.reshape(n, h, d)
  if leaf in ("gate", "up", "down", "lm_head"):
    return w.T
  if leaf == "q_bias":
    return w.reshape(n, h)
  if leaf in ("k_bias", "v_bias"):
    return w.reshape(k, h)
  return w


def params_from_hf(
    cfg: ModelConfig,
    get: Callable[[str], np.ndarray],
    *,
    norm_plus_one: bool,
    dtype=np.float32,
) -> dict:
  """Build our params from a getter of HF-named tensors.

  `norm_plus_one`: HF Gemma stores RMSNorm weights as w and multiplies by (1 + w);
  our RMSNorm multiplies by its weight, so the 1 is folded in here (GGUF already did).
  """
  flat = {}
  for name, pattern in hf_names(cfg).items():
    is_norm = name.endswith("norm")

    def one(i=None):
      w = np.asarray(get(pattern.format(i=i)), dtype=np.float32)
      if is_norm and norm_plus_one:
        w = w + 1.0
      return _to_ours(name, w, cfg).astype(dtype)

    if name.startswith("layers/"):
      flat[name] = np.stack([one(i) for i in range(cfg.num_layers)])
    else:
      flat[name] = one()
    want = param_shapes(cfg)[name][0]
    if flat[name].shape != want:
      raise ValueError(f"{pattern}: converted shape {flat[name].shape} != expected {want}")
  return unflatten(flat)


def norm_plus_one(cfg: ModelConfig) -> bool:
  """Whether this family's HF checkpoints store RMSNorm weights as w, applied as (1 + w) (Gemma's do)."""
  return cfg.family.startswith("gemma")


def params_to_hf(cfg: ModelConfig, params: dict, *, norm_plus_one: bool) -> dict[str, np.ndarray]:
  """Inverse of `params_from_hf`: HF-named tensors in torch layout (for export)."""
  out = {}
  for name, w in flatten(params).items():
    pattern = hf_names(cfg)[name]
    arrays = [np.asarray(x, np.float32) for x in w] if name.startswith("layers/") else [np.asarray(w, np.float32)]
    for i, a in enumerate(arrays):
      leaf = name.split("/")[-1]
      if leaf in ("q", "k", "v"):
        a = a.reshape(a.shape[0], -1).T
      elif leaf == "o":
        a = a.reshape(-1, a.shape[-1]).T
      elif leaf in ("gate", "up", "down", "lm_head"):
        a = a.T
      elif leaf.endswith("bias"):
        a = a.reshape(-1)
      elif name.endswith("norm") and norm_plus_one:
        a = a - 1.0
      out[pattern.format(i=i)] = np.ascontiguousarray(a)
  return out
