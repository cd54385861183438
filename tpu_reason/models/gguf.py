"""Read a GGUF file: architecture config, dequantized weights, and tokenizer."""

from __future__ import annotations

import numpy as np

from tpu_reason.models.transformer import ModelConfig

# GGUF tensor name -> HF tensor name ({i} = layer); the ffn_norm target differs per family.
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  value = field.contents()
  return value


def read_config(reader) -> ModelConfig:
  """ModelConfig from GGUF metadata (llama and gemma3 architectures)."""
  arch = _field(reader, "general.architecture")
  g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
  names = {t.name for t in reader.tensors}
  common = dict(
      vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
      embed_dim=g("embedding_length"),
      hidden_dim=g("feed_forward_length"),
      num_layers=g("block_count"),
      num_heads=g("attention.head_count"),
      num_kv_heads=g("attention.head_count_kv"),
      norm_eps=float(g("attention.layer_norm_rms_epsilon")),
      rope_theta=float(g("rope.freq_base", 10_000.0)),
      tie_embeddings="output.weight" not in names,
  )
  if arch == "llama":
    head_dim = g("rope.dimension_count") or common["embed_dim"] // common["num_heads"]
    return ModelConfig(family="llama", head_dim=head_dim, **common)
  if arch == "gemma3":
    head_dim = g("attention.key_length")
    return ModelConfig(
        family="gemma3", head_dim=head_dim, qk_norm=True, post_norms=True, embed_scale=True,
        act="gelu_tanh", query_scale=head_dim**-0.5, rope_local_theta=10_000.0,
        sliding_window=g("attention.sliding_window"), global_every=6, **common)
  raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, gemma3 are)")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp interleaves q/k rows for its rotary kernel; undo it (HF layout)."""
  rows, cols = w.shape
  return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_tensors(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """All tensors dequantized to f32, renamed to HF names, in HF (torch) layout."""
  from gguf import quants

  out = {}
  for t in reader.tensors:
    w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists dims fastest-first
    name = t.name
    if name.startswith("blk."):
      _, i, kind, suffix = name.split(".", 3)
      if kind == "ffn_norm":
        hf = "pre_feedforward_layernorm" if cfg.family == "gemma3" else "post_attention_layernorm"
      else:
        hf = _GGUF_TO_HF[kind]
      if cfg.family == "llama" and kind in ("attn_q", "attn_k"):
        w = _unpermute(w, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
      name = f"model.layers.{i}.{hf}.{suffix}"
    else:
      name = _GGUF_TO_HF[name]
    out[name] = w
  return out


def read_tokenizer(reader, family: str):
  """A transformers fast tokenizer rebuilt from GGUF vocabulary metadata."""
  from tokenizers import AddedToken, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.ggml import convert_gguf_tokenizer

  kind = _field(reader, "tokenizer.ggml.model")
  tdict = {
      "tokens": list(_field(reader, "tokenizer.ggml.tokens")),
      "token_type": list(_field(reader, "tokenizer.ggml.token_type")),
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "unk_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
      "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
  }
  if "tokenizer.ggml.merges" in reader.fields:
    tdict["merges"] = list(_field(reader, "tokenizer.ggml.merges"))
  if "tokenizer.ggml.scores" in reader.fields:
    tdict["scores"] = [float(x) for x in _field(reader, "tokenizer.ggml.scores")]
  if kind == "gpt2":
    backend, extra = convert_gguf_tokenizer("gpt2", tdict)
  else:
    backend, extra = _sentencepiece_bpe(tdict), {}
  if _field(reader, "tokenizer.ggml.pre") == "smollm":
    # SmolLM's tokenizer splits every digit before byte-level BPE (llama.cpp 'smollm').
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
  # Control tokens (<|im_end|>, <end_of_turn>) are special; user-defined ones (Gemma's
  # whitespace runs such as "\n\n") must also match atomically but survive decoding.
  types = dict(zip(tdict["tokens"], tdict["token_type"]))
  backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in types.items() if k == 4])
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in types.items() if k == 3])
  tokens = tdict["tokens"]
  special = lambda key: tokens[tdict[key]] if tdict.get(key) is not None else None  # noqa: E731
  tok = PreTrainedTokenizerFast(
      tokenizer_object=backend,
      bos_token=special("bos_token_id"),
      eos_token=special("eos_token_id"),
      unk_token=special("unk_token_id"),
      pad_token=special("pad_token_id"),
      **extra,
  )
  template = _field(reader, "tokenizer.chat_template")
  if template:
    tok.chat_template = template
  return tok


def _sentencepiece_bpe(tdict):
  """SentencePiece-BPE (Gemma) as a `tokenizers` BPE: merges ranked by piece score."""
  from tokenizers import Tokenizer, decoders, models, normalizers
  from transformers.convert_slow_tokenizer import generate_merges

  vocab = {t: i for i, t in enumerate(tdict["tokens"])}
  merges = generate_merges(vocab, list(zip(tdict["tokens"], tdict["scores"])))
  unk = tdict["tokens"][tdict["unk_token_id"]]
  tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", "\u2581")
  tok.decoder = decoders.Sequence([
      decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
  return tok
