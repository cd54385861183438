"""One decoder-only transformer for the Llama, Qwen2/3 and Gemma2/3 families.

Params are a plain pytree with layers stacked on a leading axis so the forward
is a single `lax.scan` (fast compiles, one code path for 1 or 30 layers).
LoRA adapters live in a separate pytree (see `tpu_reason.lora`); passing
`lora=None` gives the base model, which is also the GRPO reference policy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason import choices
from tpu_reason.models import quant as quant_lib
from tpu_reason.sharding import constrain, gathered
from tpu_reason.tree import flatten, unflatten

Params = dict[str, Any]

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters. `family` names the architecture for the loaders and exporters (checkpoint
  names and conventions); the forward pass reads only the flags below, never the family."""

  family: str
  vocab_size: int
  embed_dim: int
  hidden_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_local_theta: float | None = None  # gemma3 sliding layers (never scaled)
  # RoPE scaling (transformers' rope_type) of the layers that use rope_theta: "default" (none),
  # "linear" (Gemma-3 4B+, global layers) or "llama3" (Llama-3.1+, with the three fields after factor).
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float | None = None
  rope_high_freq_factor: float | None = None
  rope_original_max_positions: int | None = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = False
  qk_norm: bool = False
  post_norms: bool = False  # gemma2/3 norm the sublayer outputs too
  embed_scale: bool = False  # gemma multiplies embeddings by sqrt(D)
  act: str = "silu"  # or "gelu_tanh"
  query_scale: float | None = None  # default head_dim ** -0.5
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  global_every: int = 1  # gemma3: every 6th layer is global; gemma2: every 2nd
  quant: str = "none"  # storage of the projections on device: none | int8 | int4 (see models.quant)
  # ids of tokens added by surgery (`models.add_tokens`): their embedding rows (untied: head columns too)
  # train as deltas in the LoRA's `tokens` subtree
  new_tokens: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "new_tokens", tuple(self.new_tokens))  # a list from JSON would not hash (jit's static cfg)
    if self.family not in FAMILIES:
      raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

  def is_global(self, layer: int) -> bool:
    """Whether `layer` attends to the whole context (else a sliding window)."""
    return self.sliding_window is None or (layer + 1) % self.global_every == 0

  @property
  def num_params(self) -> int:
    """Total parameter count, from shapes alone."""
    d, f, n, k, h = self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d
    per_layer += (2 * h if self.qk_norm else 0) + (2 * d if self.post_norms else 0)
    per_layer += (n + 2 * k) * h if self.qkv_bias else 0
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.vocab_size * d + head + d + self.num_layers * per_layer


# --------------------------------------------------------------------------- params


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Flat name -> (shape, logical axes) for every base parameter."""
  L, D, F = cfg.num_layers, cfg.embed_dim, cfg.hidden_dim
  N, K, H, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
  s = {
      "embed": ((V, D), ("vocab", "embed")),
      "final_norm": ((D,), ("norm",)),
      "layers/attn_norm": ((L, D), ("layers", "norm")),
      "layers/ffn_norm": ((L, D), ("layers", "norm")),
      "layers/q": ((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
      "layers/k": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "layers/v": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "layers/o": ((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
      "layers/gate": ((L, D, F), ("layers", "embed", "mlp")),
      "layers/up": ((L, D, F), ("layers", "embed", "mlp")),
      "layers/down": ((L, F, D), ("layers", "mlp", "embed")),
  }
  if not cfg.tie_embeddings:
    s["lm_head"] = ((D, V), ("embed", "vocab"))
  if cfg.qkv_bias:
    s["layers/q_bias"] = ((L, N, H), ("layers", "heads", "head_dim"))
    s["layers/k_bias"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
    s["layers/v_bias"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
  if cfg.qk_norm:
    s["layers/q_norm"] = ((L, H), ("layers", "norm"))
    s["layers/k_norm"] = ((L, H), ("layers", "norm"))
  if cfg.post_norms:
    s["layers/post_attn_norm"] = ((L, D), ("layers", "norm"))
    s["layers/post_ffn_norm"] = ((L, D), ("layers", "norm"))
  if cfg.quant != "none":
    for p in PROJECTIONS:
      shape, axes = s[f"layers/{p}"]
      s[f"layers/{p}_scale"] = (quant_lib.scale_shape(cfg.quant, shape, n_inputs(p)), axes)
  return s


def param_dtypes(cfg: ModelConfig, dtype) -> dict[str, Any]:
  """Flat name -> dtype on device: the quantised projections' own format, `dtype` for the rest."""
  low = quant_lib.DTYPES.get(cfg.quant)
  return {name: low if low is not None and name.split("/")[-1] in PROJECTIONS else dtype
          for name in param_shapes(cfg)}


def quantize_params(params: Params, cfg: ModelConfig) -> Params:
  """Host params with the projections in `cfg.quant` (values + scales); unchanged for "none" or if done."""
  flat = flatten(params)
  if cfg.quant == "none" or "layers/q_scale" in flat:
    return params
  for p in PROJECTIONS:
    flat[f"layers/{p}"], flat[f"layers/{p}_scale"] = quant_lib.quantize(flat[f"layers/{p}"], cfg.quant, n_inputs(p))
  return unflatten(flat)


def as_computed(params: Params, cfg: ModelConfig) -> Params:
  """Float host params equal to what the device computes with under `cfg.quant` (a QLoRA run's export)."""
  flat = flatten(quantize_params(params, cfg))
  if cfg.quant == "none":
    return params
  for p in PROJECTIONS:
    scale = flat.pop(f"layers/{p}_scale")
    flat[f"layers/{p}"] = np.asarray(quant_lib.dequantize(flat[f"layers/{p}"], scale, n_inputs(p) + 1, jnp.float32))
  return unflatten(flat)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
  """Random params for tests (norm weights are 1, matrices ~ N(0, 1/fan_in)), quantised as `cfg.quant` says."""
  flat = {}
  for i, (name, (shape, axes)) in enumerate(sorted(param_shapes(dataclasses.replace(cfg, quant="none")).items())):
    if "norm" in name:
      flat[name] = jnp.ones(shape, dtype)
    elif "bias" in name:
      flat[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, dtype)
    else:
      fan_in = shape[1] if axes[0] == "layers" else shape[0]
      if name.endswith("/o"):
        fan_in = shape[1] * shape[2]
      flat[name] = jax.random.normal(jax.random.fold_in(key, i), shape, dtype) / math.sqrt(fan_in)
  if cfg.quant == "none":
    return unflatten(flat)
  return jax.tree.map(jnp.asarray, quantize_params(unflatten(jax.tree.map(np.asarray, flat)), cfg))


# --------------------------------------------------------------------------- layers


def rms_norm(x, w, eps):
  """RMSNorm in f32; `w` is the full multiplier (gemma's 1+w folded in at load)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(cfg: ModelConfig, is_global=True):
  """RoPE inverse frequencies [head_dim / 2] of a global layer (rope_theta, scaled by rope_type) or,
  where `is_global` (a layer's flag, maybe traced) is false, of gemma3's local ones (unscaled).

  Built at trace time from the config in float32 with transformers' operations
  (modeling_rope_utils), so they match its frequencies; positions only multiply them.
  """
  h = cfg.head_dim
  theta = cfg.rope_theta
  if cfg.rope_local_theta is not None:
    theta = jnp.where(is_global, cfg.rope_theta, cfg.rope_local_theta)
  inv = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if cfg.rope_type == "default":
    return inv
  if cfg.rope_type == "linear":
    scaled = inv / cfg.rope_factor
  elif cfg.rope_type == "llama3":  # long wavelengths / factor, short ones kept, smooth in between
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_positions
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    scaled = jnp.where(medium, smoothed, scaled)
  else:
    raise ValueError(f"unsupported rope_type {cfg.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
  return scaled if cfg.rope_local_theta is None else jnp.where(is_global, scaled, inv)


def rope(x_BxTxNxH, pos_BxT, inv_freq_H2):
  """Rotary embedding, HF 'rotate_half' layout (first half / second half)."""
  ang_BxTxH2 = pos_BxT[..., None].astype(jnp.float32) * inv_freq_H2
  sin, cos = jnp.sin(ang_BxTxH2)[:, :, None, :], jnp.cos(ang_BxTxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def softcap(x, cap):
  return x if cap is None else cap * jnp.tanh(x / cap)


# Each projection's einsum: activations x weights.
PROJECTIONS = {
    "q": "btd,dnh->btnh", "k": "btd,dkh->btkh", "v": "btd,dkh->btkh", "o": "btnh,nhd->btd",
    "gate": "btd,df->btf", "up": "btd,df->btf", "down": "btf,fd->btd",
}


# Logical axes of each projection's output (its input's are the previous output's).
OUT_AXES = {"q": ("batch", "seq", "heads", "head_dim"), "k": ("batch", "seq", "kv_heads", "head_dim"),
            "v": ("batch", "seq", "kv_heads", "head_dim"), "o": ("batch", "seq", "act_embed"),
            "gate": ("batch", "seq", "mlp"), "up": ("batch", "seq", "mlp"), "down": ("batch", "seq", "act_embed")}
RESIDUAL = ("batch", "seq", "act_embed")


def n_inputs(name: str) -> int:
  """How many leading axes of projection `name`'s weight its einsum contracts (2 for o: heads x head_dim)."""
  x, w = PROJECTIONS[name].split("->")[0].split(",")
  return sum(c in x for c in w)


def project(name, x, layer, lora_layer, lora_scale):
  """x @ W (+ scale * x @ A @ B when this projection has a LoRA adapter); W widened here if quantised."""
  if f"{name}_scale" in layer:
    y = quantized_matmul(PROJECTIONS[name], x, layer[name], layer[f"{name}_scale"], n_inputs(name))
  else:
    y = jnp.einsum(PROJECTIONS[name], x, layer[name].astype(x.dtype))
  y = constrain(y, OUT_AXES[name])
  if lora_layer is not None and name in lora_layer:
    a, b = lora_layer[name]["a"].astype(x.dtype), lora_layer[name]["b"].astype(x.dtype)
    rank, rows = a.shape[-1], y.shape[0] * y.shape[1]
    low = low_rank(x.reshape(rows, -1), a.reshape(-1, rank), b.reshape(rank, -1))
    y = y + lora_scale * constrain(low.reshape(y.shape), OUT_AXES[name])
  return y


@functools.partial(jax.checkpoint, static_argnums=(0, 4))
def quantized_matmul(spec, x, values, scale, n_in):
  """x @ W for an int8 / int4 W (gathered small by FSDP), widened to x's dtype one projection at a time.

  Widening and matmul form one remat region: the backward keeps the small values and widens again.
  Outside it, the wide W would be the matmul's residual, and the scan would stack every layer's.
  """
  return jnp.einsum(spec, x, quant_lib.dequantize(values, scale, n_in, x.dtype))


@jax.custom_vjp
def low_rank(x_NxI, a_IxR, b_RxO):
  """x @ a @ b, with a hand-written backward that transposes only rank-r operands.

  Autodiff's gradients of a and b contract over the N rows of the activations (xᵀ @ dlow,
  lowᵀ @ dy), and XLA:CPU made row-major copies of the activation-sized operand for each,
  per projection and layer: 17% of a GRPO train step. Here the small side is transposed.
  """
  return (x_NxI @ a_IxR) @ b_RxO


def _low_rank_fwd(x_NxI, a_IxR, b_RxO):
  low_NxR = x_NxI @ a_IxR
  return low_NxR @ b_RxO, (x_NxI, a_IxR, b_RxO, low_NxR)


def _low_rank_bwd(res, dy_NxO):
  x_NxI, a_IxR, b_RxO, low_NxR = res
  dlow_NxR = dy_NxO @ b_RxO.T
  return dlow_NxR @ a_IxR.T, (dlow_NxR.T @ x_NxI).T, low_NxR.T @ dy_NxO


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "valid", "pos"],
                   meta_fields=["group", "span"])
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values for S slots of every layer; `valid` marks slots holding real tokens.

  `group` > 1 means each cache row is shared by `group` consecutive query rows: the
  prompt of a GRPO group is prefilled once and read by all its G samples.
  `span` < S makes attention read only the first `span` slots (the filled part of a
  decode cache), so early decode steps don't stream empty slots.
  """

  k: jax.Array  # [L, B, K, H, S]: keys transposed, so q @ k is a plain matmul
  v: jax.Array  # [L, B, K, S, H]
  valid: jax.Array  # [B, S] bool
  pos: jax.Array  # [B, S] int32 position of the token in each slot
  group: int = 1
  span: int | None = None

  def layer(self, index):
    """(k, v, pos, valid, group) of one layer over the first `span` slots."""
    s = self.v.shape[3] if self.span is None else self.span
    _, b, kh, h = self.v.shape[:3] + self.v.shape[4:]
    k = jax.lax.dynamic_slice(self.k, (index, 0, 0, 0, 0), (1, b, kh, h, s))[0]
    v = jax.lax.dynamic_slice(self.v, (index, 0, 0, 0, 0), (1, b, kh, s, h))[0]
    return k, v, self.pos[:, :s], self.valid[:, :s], self.group


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
  lbk, h = (cfg.num_layers, batch, cfg.num_kv_heads), cfg.head_dim
  return constrain_cache(KVCache(jnp.zeros((*lbk, h, slots), dtype), jnp.zeros((*lbk, slots, h), dtype),
                 jnp.zeros((batch, slots), bool), jnp.zeros((batch, slots), jnp.int32)))


def write(cache: KVCache, k_LxBxKxHxT, v_LxBxKxTxH, pos_BxT, valid_BxT, index) -> KVCache:
  """Store T new tokens at slot `index` (in place inside a jitted loop)."""
  upd = lambda buf, x, axis: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), index, axis)  # noqa: E731
  return constrain_cache(dataclasses.replace(
      cache, k=upd(cache.k, k_LxBxKxHxT, 4), v=upd(cache.v, v_LxBxKxTxH, 3),
      valid=upd(cache.valid, valid_BxT, 1), pos=upd(cache.pos, pos_BxT.astype(jnp.int32), 1)))


# The logical axes of a KV cache's arrays (`sharding`'s table places them): each chip keeps the keys/values
# of its own rows (and its tp share of the kv heads).
CACHE_AXES = {"k": ("layers", "batch", "kv_heads", "head_dim", "seq"),
              "v": ("layers", "batch", "kv_heads", "seq", "head_dim"),
              "valid": ("batch", "seq"), "pos": ("batch", "seq")}


def map_cache(fn, cache: KVCache) -> KVCache:
  """The cache with each array replaced by fn(array, its logical axes)."""
  return dataclasses.replace(cache, **{name: fn(getattr(cache, name), axes) for name, axes in CACHE_AXES.items()})


def constrain_cache(cache: KVCache) -> KVCache:
  """Each chip keeps the keys/values of its own rows (and its tp share of the kv heads)."""
  return map_cache(constrain, cache)


def _mask(q_pos_BxT, k_pos_BxS, k_valid_BxS, window, is_global):
  """Causal by position over valid keys; sliding-window layers also bound the distance."""
  diff = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
  mask = (diff >= 0) & k_valid_BxS[:, None, :]
  if window is not None:
    mask = mask & (is_global | (diff < window))
  return mask


def attention(q_BxTxNxH, blocks, cfg: ModelConfig):
  """Joint softmax attention over several key blocks [(k_bxKxHxS, v_bxKxSxH, mask_BxTxS, group)].

  The cache is heads-first with keys transposed ([b, K, H, S]) so both einsums are plain
  (untransposed) batched matmuls over (b, K): XLA:CPU repacks a transposed operand on every
  call, which doubled the cost of q @ k in decode. A block with group g has B/g rows,
  each read by g consecutive query rows: a shared prompt is stored and read once.
  """
  b, t, n, h = q_BxTxNxH.shape
  kh = blocks[0][0].shape[1]
  gq = n // kh
  scale = cfg.query_scale if cfg.query_scale is not None else h**-0.5
  q_BxKxGxTxH = q_BxTxNxH.reshape(b, t, kh, gq, h).transpose(0, 2, 3, 1, 4)
  all_logits = []
  for k, _, mask, g in blocks:
    # fold the g query rows that share a cache row into the query-time axis
    qg = q_BxKxGxTxH.reshape(b // g, g, kh, gq, t, h).transpose(0, 2, 3, 1, 4, 5).reshape(b // g, kh, gq, g * t, h)
    # one merged query axis (q = gq * g * t): XLA's CPU dot is much slower with size-1 dims
    qg = qg.reshape(b // g, kh, gq * g * t, h)
    lg = jnp.einsum("bkqh,bkhs->bkqs", qg, k.astype(qg.dtype)).astype(jnp.float32) * scale
    lg = lg.reshape(b // g, kh, gq, g, t, -1).transpose(0, 3, 1, 2, 4, 5).reshape(b, kh, gq, t, -1)
    lg = softcap(lg, cfg.attn_softcap)
    all_logits.append(jnp.where(mask[:, None, None], lg, -1e30))
  probs = jax.nn.softmax(jnp.concatenate(all_logits, axis=-1), axis=-1).astype(q_BxTxNxH.dtype)
  out, start = 0.0, 0
  for (_, v, _, g), lg in zip(blocks, all_logits):
    p = probs[..., start:start + lg.shape[-1]]
    start += lg.shape[-1]
    p = p.reshape(b // g, g, kh, gq, t, -1).transpose(0, 2, 3, 1, 4, 5).reshape(b // g, kh, gq * g * t, -1)
    o = jnp.einsum("bkqs,bksh->bkqh", p, v.astype(p.dtype))
    out = out + o.reshape(b // g, kh, gq, g, t, h).transpose(0, 3, 1, 2, 4, 5).reshape(b, kh, gq, t, h)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _layer(cfg: ModelConfig, x, layer, lora_layer, lora_scale, pos_BxT, valid_BxT, is_global, caches,
           segment_BxT=None):
  """One decoder block; attends to itself and to `caches` [(k, v, pos, valid, group)] of this layer.

  With `segment_BxT` (packed rows) a token attends only within its own segment.
  """
  act = jax.nn.silu if cfg.act == "silu" else (lambda z: jax.nn.gelu(z, approximate=True))
  x = constrain(x, RESIDUAL)
  h = rms_norm(x, layer["attn_norm"], cfg.norm_eps)
  q = project("q", h, layer, lora_layer, lora_scale)
  k = project("k", h, layer, lora_layer, lora_scale)
  v = project("v", h, layer, lora_layer, lora_scale)
  if cfg.qkv_bias:
    q, k, v = q + layer["q_bias"], k + layer["k_bias"], v + layer["v_bias"]
  if cfg.qk_norm:
    q, k = rms_norm(q, layer["q_norm"], cfg.norm_eps), rms_norm(k, layer["k_norm"], cfg.norm_eps)
  inv_freq = rope_inv_freq(cfg, is_global)
  q, k = rope(q, pos_BxT, inv_freq), rope(k, pos_BxT, inv_freq)

  blocks = []
  for ck, cv, cpos, cvalid, g in caches:
    qpos = pos_BxT.reshape(-1, g * pos_BxT.shape[1])
    m = _mask(qpos, cpos, cvalid, cfg.sliding_window, is_global)
    blocks.append((ck, cv, m.reshape(pos_BxT.shape[0], pos_BxT.shape[1], -1), g))
  k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, K, H, T] and [B, K, T, H]: the cache layout
  own = _mask(pos_BxT, pos_BxT, valid_BxT, cfg.sliding_window, is_global)
  if segment_BxT is not None:
    own = own & (segment_BxT[:, :, None] == segment_BxT[:, None, :])
  blocks.append((k, v, own, 1))
  out = constrain(attention(q, blocks, cfg), OUT_AXES["q"])
  out = project("o", out, layer, lora_layer, lora_scale)
  if cfg.post_norms:
    out = rms_norm(out, layer["post_attn_norm"], cfg.norm_eps)
  x = x + out

  h = rms_norm(x, layer["ffn_norm"], cfg.norm_eps)
  g = project("gate", h, layer, lora_layer, lora_scale)
  u = project("up", h, layer, lora_layer, lora_scale)
  out = project("down", constrain(act(g) * u, OUT_AXES["up"]), layer, lora_layer, lora_scale)
  if cfg.post_norms:
    out = rms_norm(out, layer["post_ffn_norm"], cfg.norm_eps)
  return constrain(x + out, RESIDUAL), (k, v)


# model.remat: what each layer keeps for its backward pass
REMAT = {
    "none": None,  # every intermediate
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projection outputs; attention recomputed
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's input; the layer runs twice
}
assert tuple(REMAT) == choices.REMAT, "choices.REMAT names these policies (config validates model.remat by it)"


def positions(valid_BxT):
  """Position of each token counting only valid ones (left padding sits at position 0)."""
  return jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0).astype(jnp.int32)


def token_delta(lora: Params | None, name: str):
  """The LoRA's trained delta of the added tokens: "embed" rows [n, D] or untied "head" columns [D, n] (else None)."""
  tokens = None if lora is None else lora.get("tokens")
  return None if tokens is None else tokens.get(name)


def embed(params: Params, cfg: ModelConfig, tokens_BxT, dtype, lora: Params | None = None):
  """Embedding rows of the tokens, with the LoRA's deltas on the rows of `cfg.new_tokens`."""
  tokens_BxT = constrain(tokens_BxT, ("batch", "seq"))
  x = params["embed"][tokens_BxT].astype(dtype)
  delta_NxD = token_delta(lora, "embed")
  if delta_NxD is not None:
    # a one-hot [B, T, n] @ [n, D]: n is a handful of tokens, and its gradient is a small matmul, not a scatter
    hit_BxTxN = (tokens_BxT[..., None] == jnp.asarray(cfg.new_tokens, tokens_BxT.dtype)).astype(dtype)
    x = x + hit_BxTxN @ delta_NxD.astype(dtype)
  if cfg.embed_scale:
    x = x * jnp.asarray(math.sqrt(cfg.embed_dim), dtype)
  return x


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens_BxT,
    pos_BxT,
    *,
    valid_BxT=None,
    lora: Params | None = None,
    lora_scale: float = 1.0,
    caches: tuple[KVCache, ...] = (),
    dtype=jnp.float32,
    remat: str = "none",
    return_kv: bool = False,
    segment_BxT=None,
):
  """Final-norm hidden states [B, T, D]; with `return_kv` also this call's keys/values.

  The T tokens attend causally (by position) to each other and to every valid slot of
  `caches`; padding tokens (valid=False) are never attended to. Keys/values come back
  in the cache layout ([L, B, K, H, T], [L, B, K, T, H]) so the caller decides where to
  store them (`write`). `segment_BxT` (packed rows: several sequences per row, positions
  restarting in each) keeps attention within a segment.
  """
  if valid_BxT is None:
    valid_BxT = jnp.ones(tokens_BxT.shape, bool)
  x = constrain(embed(params, cfg, tokens_BxT, dtype, lora), RESIDUAL)
  is_global = jnp.array([cfg.is_global(i) for i in range(cfg.num_layers)])
  lora_layers = None if lora is None else lora["layers"]

  layer_axes = {k.split("/", 1)[1]: gathered(a[1:]) for k, (_, a) in param_shapes(cfg).items()
                if k.startswith("layers/")}

  def body(x, xs):
    layer, lora_layer, glob, index = xs
    # FSDP: this layer's weights are all-gathered over fsdp here, one layer at a time
    layer = {k: constrain(w, layer_axes[k]) for k, w in layer.items()}
    # caches are sliced here rather than scanned over, so a `span` reads fewer slots
    per_layer = [c.layer(index) for c in caches]
    y, kv = _layer(cfg, x, layer, lora_layer, lora_scale, pos_BxT, valid_BxT, glob, per_layer, segment_BxT)
    return y, (kv if return_kv else None)

  if REMAT[remat] is not None:
    body = jax.checkpoint(body, policy=REMAT[remat])
  xs = (params["layers"], lora_layers, is_global, jnp.arange(cfg.num_layers))
  x, kv = jax.lax.scan(body, x, xs)
  hidden = rms_norm(x, params["final_norm"], cfg.norm_eps)
  return (hidden, kv) if return_kv else hidden


def head_weights(params: Params, cfg: ModelConfig, lora: Params | None = None):
  """The vocabulary head [D, V]: the tied embedding or lm_head, with the LoRA's deltas on the columns of
  `cfg.new_tokens` (tied: the embedding rows' deltas, so both ends of the model see one trained row)."""
  w_DxV = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  delta = token_delta(lora, "embed" if cfg.tie_embeddings else "head")
  if delta is None:
    return w_DxV
  delta_DxN = delta.T if cfg.tie_embeddings else delta
  return jnp.asarray(w_DxV).at[:, jnp.asarray(cfg.new_tokens)].add(delta_DxN.astype(w_DxV.dtype))


def logits(params: Params, cfg: ModelConfig, hidden_BxTxD, lora: Params | None = None):
  """Vocabulary logits; only call on few positions (Gemma's vocabulary is 262k)."""
  w = head_weights(params, cfg, lora)
  out = jnp.einsum("btd,dv->btv", hidden_BxTxD, w.astype(hidden_BxTxD.dtype)).astype(jnp.float32)
  return softcap(constrain(out, ("batch", "seq", "vocab")), cfg.final_softcap)
