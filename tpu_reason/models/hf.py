"""Hugging Face checkpoints (local dir or hub id): config.json + safetensors + tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from tpu_reason.errors import UserError
from tpu_reason.models.transformer import ROPE_TYPES, ModelConfig

# The fields `config_from_hf` reads, copied from each model's public config.json, so memory
# plans and dry runs know the real shapes offline (the weights still come from the hub).
KNOWN_CONFIGS = {
    "google/gemma-3-1b-it": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        sliding_window=512, sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None),
    "google/gemma-2-2b-it": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=10_000.0, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, tie_word_embeddings=False),
}

_FAMILY = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
}


def config_from_hf(c: dict) -> ModelConfig:
  """ModelConfig from a transformers config.json dict."""
  if "text_config" in c:  # multimodal Gemma-3 wraps the language model config
    c = {**c["text_config"], "model_type": c["text_config"].get("model_type", "gemma3_text")}
  family = _FAMILY.get(c.get("model_type", ""))
  if family is None:
    raise UserError(f"unsupported model_type {c.get('model_type')!r}; supported: {sorted(_FAMILY)}")
  n = c["num_attention_heads"]
  kw = dict(
      family=family,
      vocab_size=c["vocab_size"],
      embed_dim=c["hidden_size"],
      hidden_dim=c["intermediate_size"],
      num_layers=c["num_hidden_layers"],
      num_heads=n,
      num_kv_heads=c.get("num_key_value_heads", n),
      head_dim=c.get("head_dim") or c["hidden_size"] // n,
      rope_theta=_rope_theta(c, "full_attention"),
      **_rope_scaling(c, "full_attention"),
      norm_eps=c.get("rms_norm_eps", 1e-6),
      # transformers' own defaults: Gemma ties embeddings, Llama / Qwen do not
      tie_embeddings=c.get("tie_word_embeddings", family.startswith("gemma")),
  )
  if family == "qwen2":
    kw["qkv_bias"] = True
  if family == "qwen3":
    kw["qk_norm"] = True
  if family.startswith("gemma"):
    kw.update(post_norms=True, embed_scale=True, act="gelu_tanh",
              query_scale=c.get("query_pre_attn_scalar", kw["head_dim"]) ** -0.5,
              attn_softcap=c.get("attn_logit_softcapping"),
              final_softcap=c.get("final_logit_softcapping"),
              sliding_window=c.get("sliding_window"))
  if family == "gemma2":
    kw["global_every"] = 2
  if family == "gemma3":
    kw.update(qk_norm=True, global_every=_global_every(c),
              rope_local_theta=_rope_theta(c, "sliding_attention", c.get("rope_local_base_freq", 10_000.0)))
    local = _rope_scaling(c, "sliding_attention")["rope_type"]
    if local != "default":
      raise UserError(f"RoPE scaling {local!r} on Gemma-3's sliding-window layers is not supported "
                      "(only on its global layers)")
  return ModelConfig(**kw)


def known_config(spec: str) -> ModelConfig | None:
  """The architecture of a hub id in KNOWN_CONFIGS or of a local HF directory, without weights."""
  if spec in KNOWN_CONFIGS:
    return config_from_hf(KNOWN_CONFIGS[spec])
  if (Path(spec) / "config.json").is_file():
    return config_from_hf(json.loads((Path(spec) / "config.json").read_text()))
  return None


# family -> (model_type, architecture) that transformers instantiates
_HF_CLASS = {
    "llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
# ModelConfig does not record the trained context length; RoPE models only use this as a
# generation default, so a common value is written.
MAX_POSITIONS = 8192


def config_to_hf(cfg: ModelConfig) -> dict:
  """transformers config.json dict for `cfg` (inverse of `config_from_hf`), float32 weights.

  RoPE is written both as transformers 5 `rope_parameters` and as the legacy keys older
  versions read.
  """
  model_type, arch = _HF_CLASS[cfg.family]
  gemma = cfg.family.startswith("gemma")
  scaling = {}
  if cfg.rope_type in ("linear", "llama3"):
    scaling["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    scaling.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_positions)
  c = dict(
      architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
      intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=MAX_POSITIONS, dtype="float32",
      rope_theta=cfg.rope_theta, rope_parameters={"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **scaling},
  )
  if scaling:  # transformers 4 reads the scaling here (gemma3: for its global layers)
    c["rope_scaling"] = {"rope_type": cfg.rope_type, **scaling}
  c["hidden_activation" if gemma else "hidden_act"] = "gelu_pytorch_tanh" if cfg.act == "gelu_tanh" else cfg.act
  if cfg.family == "llama":
    c.update(attention_bias=False, mlp_bias=False)
  if gemma:
    scalar = round((cfg.query_scale if cfg.query_scale is not None else cfg.head_dim**-0.5) ** -2, 6)
    c.update(query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar,  # transformers wants an int
             attn_logit_softcapping=cfg.attn_softcap,
             final_logit_softcapping=cfg.final_softcap, sliding_window=cfg.sliding_window,
             layer_types=["full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.num_layers)])
  if cfg.family == "gemma3":
    local = cfg.rope_local_theta if cfg.rope_local_theta is not None else 10_000.0
    c.update(sliding_window_pattern=cfg.global_every, rope_local_base_freq=local, rope_parameters={
        "full_attention": c["rope_parameters"], "sliding_attention": {"rope_type": "default", "rope_theta": local}})
  return c


def _rope_theta(c: dict, layer_type: str, default: float = 10_000.0) -> float:
  """rope_theta from old-style configs or transformers 5 `rope_parameters` (maybe per layer type)."""
  if c.get("rope_theta") is not None:
    return float(c["rope_theta"]) if layer_type == "full_attention" else float(default)
  rp = c.get("rope_parameters") or {}
  rp = rp.get(layer_type, rp)
  theta = rp.get("rope_theta")
  return float(theta if theta is not None else default)


def _rope_scaling(c: dict, layer_type: str) -> dict:
  """ModelConfig's rope_type (and its parameters) of `layer_type` layers, from transformers 5
  `rope_parameters` (maybe per layer type) or the legacy `rope_scaling` (gemma3: global layers).

  An unsupported type is kept as is: loading weights refuses it (`check_rope`), while
  tokenizer-only users need not care.
  """
  rp = c.get("rope_parameters") or {}
  if "full_attention" in rp or "sliding_attention" in rp:
    rp = rp.get(layer_type) or {}
  legacy = (c.get("rope_scaling") or {}) if layer_type == "full_attention" else {}
  p = {}
  for d in (rp, legacy):  # the legacy dict wins, as in transformers; it may say "type"
    d = dict(d)
    if "type" in d:
      d.setdefault("rope_type", d.pop("type"))
    p.update(d)
  kind = p.get("rope_type") or "default"
  out = {"rope_type": kind}

  def need(key):
    if p.get(key) is None:
      raise UserError(f"RoPE scaling {kind!r} needs {key!r} in the config's rope_parameters / rope_scaling")
    return p[key]

  if kind in ("linear", "llama3"):
    out["rope_factor"] = float(need("factor"))
  if kind == "llama3":  # the original length as transformers takes it: a top-level key wins
    if c.get("original_max_position_embeddings") is not None or p.get("original_max_position_embeddings") is None:
      p["original_max_position_embeddings"] = c.get("original_max_position_embeddings") or c.get("max_position_embeddings")
    out.update(rope_low_freq_factor=float(need("low_freq_factor")), rope_high_freq_factor=float(need("high_freq_factor")),
               rope_original_max_positions=int(need("original_max_position_embeddings")))
  return out


def check_rope(cfg: ModelConfig, where: str):
  """Refuse a RoPE scaling our forward does not implement: it would give silently wrong logits."""
  if cfg.rope_type not in ROPE_TYPES:
    raise UserError(f"{where}: RoPE scaling rope_type {cfg.rope_type!r} is not supported "
                    f"(supported: {', '.join(ROPE_TYPES)}); its logits would be wrong")


def _global_every(c: dict) -> int:
  """Gemma-3's period of full-attention layers, from `layer_types` or the legacy pattern."""
  types = c.get("layer_types")
  if types and "full_attention" in types:
    return types.index("full_attention") + 1
  return c.get("sliding_window_pattern", 6)


def _resolve(spec: str, weights: bool = True) -> Path:
  path = Path(spec)
  if path.is_dir():
    return path
  if path.exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
    raise UserError(
        f"unknown model {spec!r}: not an embedded model (smollm2-135m, gemma3-270m), "
        "a .gguf file, a Hugging Face directory, or an org/name hub id")
  try:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer*"] + (["*.safetensors"] if weights else [])
    return Path(snapshot_download(spec, allow_patterns=patterns))
  except Exception as e:  # offline, gated, or missing: one clear line
    reason = " ".join(str(e).split())  # hub messages span lines; errors are one line
    raise UserError(f"cannot fetch {spec!r} from the Hugging Face hub: {type(e).__name__}: {reason}") from None


def load(spec: str, weights: bool = True) -> tuple:
  """A Hugging Face checkpoint directory (or hub id) as a `Model`'s fields: (name, cfg, params, tokenizer,
  eos_ids), params None without weights (`models.load` builds the Model: this module does not import it back)."""
  from safetensors import safe_open

  from tpu_reason.models import convert

  path = _resolve(spec, weights)
  if not (path / "config.json").exists():
    raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
  cfg = config_from_hf(json.loads((path / "config.json").read_text()))
  if not weights:
    return (path.name, cfg, None, *_tokenizer(path, cfg))
  check_rope(cfg, str(path))
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise UserError(f"{path} has no *.safetensors weights")
  handles = [safe_open(str(f), framework="numpy") for f in files]
  where = {k: h for h in handles for k in h.keys()}

  def get(name):
    for alt in (name, name.replace("model.", "model.language_model.", 1), "language_model." + name):
      if alt in where:
        return where[alt].get_tensor(alt)
    raise UserError(f"{path}: tensor {name!r} not found in the safetensors files")

  params = convert.params_from_hf(cfg, get, norm_plus_one=convert.norm_plus_one(cfg))
  return (path.name, cfg, params, *_tokenizer(path, cfg))


def _tokenizer(path: Path, cfg: ModelConfig):
  """(tokenizer, stop ids) of a Hugging Face model directory."""
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(str(path))
  eos = {tok.eos_token_id}
  gen = path / "generation_config.json"
  if gen.exists():
    e = json.loads(gen.read_text()).get("eos_token_id")
    eos |= set(e if isinstance(e, list) else [e] if e is not None else [])
  if cfg.family == "gemma3":
    eos |= {1, 106}  # <eos> and <end_of_turn>: instruction-tuned Gemma ends turns with 106
  return tok, tuple(sorted(i for i in eos if i is not None))
