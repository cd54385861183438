"""Regenerate the per-family golden checkpoints and logits with transformers + torch on CPU.

Not run in CI (torch is not a dependency); tests/test_golden_families.py checks against the
committed output without torch. Run once after changing anything here:
  pip install torch==2.13.0 transformers && python tests/golden/make_family_golden.py

For each family (llama, qwen2, qwen3, gemma2, gemma3) this writes a tiny random checkpoint
with transformers' own `save_pretrained` (config.json + float32 model.safetensors) plus a
small word-level tokenizer under families/<family>/, and families/<family>.npz holding:

  ids            [B, T] input token ids (T = 24 > the sliding window of 8)
  logits         [B, T, V] transformers' float32 logits of the checkpoint
  lora.<module>.lora_A / lora_B   a random rank-2 LoRA in PEFT layout ([r, in], [out, r])
  lora_scale     its scale (alpha / r)
  merged_logits  transformers' logits with W += lora_scale * lora_B @ lora_A folded into every
                 targeted projection: what a correct merged export must reproduce

families/<variant>.npz (ids, logits, rope_parameters as JSON) holds the logits of a family's
checkpoint with a scaled RoPE written into its config (ROPE_VARIANTS): Llama-3.x's "llama3"
and Gemma-3 4B+'s "linear" global-layer scaling.

Weights are perturbed away from transformers' init (norm weights are not all one, matrices
~ N(0, 1/fan_in)), and gemma2's soft-caps are small enough to bend the values.
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

OUT = Path(__file__).resolve().parent / "families"
VOCAB = 256
BATCH, SEQ = 1, 24
SEED = 1234
RANK, ALPHA = 2, 4.0
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             bos_token_id=2, eos_token_id=1, pad_token_id=0)
GEMMA = dict(hidden_activation="gelu_pytorch_tanh", sliding_window=8, query_pre_attn_scalar=32)

FAMILIES = {
    "llama": LlamaConfig(**SHAPE, num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 500_000.0}),
    "qwen2": Qwen2Config(**SHAPE, num_hidden_layers=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
    "qwen3": Qwen3Config(**SHAPE, num_hidden_layers=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
    # sliding, full, sliding: layer 2 checks the window is applied again after a global layer
    "gemma2": Gemma2Config(**SHAPE, **GEMMA, num_hidden_layers=3, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           attn_logit_softcapping=2.0, final_logit_softcapping=10.0,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    # a period of 3 (not gemma2's 2): sliding, sliding, full, sliding; local and global rope bases differ
    "gemma3": Gemma3TextConfig(**SHAPE, **GEMMA, num_hidden_layers=4, rms_norm_eps=1e-6, tie_word_embeddings=True,
                               attn_logit_softcapping=None, final_logit_softcapping=None,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"],
                               rope_parameters={
                                   "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}

# variant -> (family whose weights it reuses, the config's rope_parameters)
ROPE_VARIANTS = {
    # Llama-3.1/3.2 style; a short original context (64) so the 24-token input sees the change
    "llama-rope-llama3": ("llama", {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
    # Gemma-3 4B+: linear scaling (factor 8) of the global layers only
    "gemma3-rope-linear": ("gemma3", {"full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0,
                                                         "factor": 8.0},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def write_tokenizer(path: Path):
  """A word-level tokenizer ("w17" -> 17): our loader and the export both need one."""
  from tokenizers import Tokenizer, pre_tokenizers
  from tokenizers import models as tok_models

  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
  vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                          pad_token="<pad>").save_pretrained(path)


@torch.no_grad()
def perturb(model, gen):
  """Weights away from transformers' init: matrices ~ N(0, 1/fan_in), norms 1 + noise (gemma's
  stored w of a (1 + w) multiplier: noise), biases noise, embeddings ~ N(0, 1)."""
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if "norm" in name or name.endswith(".bias"):
      p.add_(0.1 * noise)
    elif "embed_tokens" in name:
      p.copy_(noise)
    else:
      p.copy_(noise / p.shape[1] ** 0.5)


def random_lora(model, gen):
  """{module: (lora_A [r, in], lora_B [out, r])} for every target of every layer."""
  out = {}
  for i in range(model.config.num_hidden_layers):
    for t in TARGETS:
      name = f"model.layers.{i}.{t}"
      w = model.get_submodule(name).weight
      a = torch.randn((RANK, w.shape[1]), generator=gen) / w.shape[1] ** 0.5
      b = 0.2 * torch.randn((w.shape[0], RANK), generator=gen)
      out[name] = (a, b)
  return out


def main():
  torch.set_num_threads(1)
  OUT.mkdir(exist_ok=True)
  for index, (family, config) in enumerate(FAMILIES.items()):
    gen = torch.Generator().manual_seed(SEED + index)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    perturb(model, gen)
    path = OUT / family
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    write_tokenizer(path)
    ids = torch.randint(4, VOCAB, (BATCH, SEQ), generator=gen)
    ids[:, 0] = 2  # <bos>
    with torch.no_grad():
      logits = model(ids).logits.float().numpy()
      lora = random_lora(model, gen)
      scale = ALPHA / RANK
      for name, (a, b) in lora.items():
        model.get_submodule(name).weight.add_(scale * b @ a)
      merged = model(ids).logits.float().numpy()
    arrays = {f"lora.{name}.lora_A": a.numpy() for name, (a, _) in lora.items()}
    arrays |= {f"lora.{name}.lora_B": b.numpy() for name, (_, b) in lora.items()}
    np.savez_compressed(OUT / f"{family}.npz", ids=ids.numpy(), logits=logits, merged_logits=merged,
                        lora_scale=np.float32(scale), **arrays)
    types = json.loads((path / "config.json").read_text()).get("layer_types")
    print(f"{family}: logits |max| {np.abs(logits).max():.2f}, LoRA moves them by {np.abs(merged - logits).max():.3f}"
          f", layers {types}")

  for variant, (family, rope) in ROPE_VARIANTS.items():
    with tempfile.TemporaryDirectory() as tmp:
      path = Path(tmp) / variant
      shutil.copytree(OUT / family, path)
      config = json.loads((path / "config.json").read_text())
      (path / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
      model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
      ids = np.load(OUT / f"{family}.npz")["ids"]
      with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.float().numpy()
    base = np.load(OUT / f"{family}.npz")["logits"]
    np.savez_compressed(OUT / f"{variant}.npz", ids=ids, logits=logits, rope_parameters=json.dumps(rope))
    print(f"{variant}: scaled RoPE moves the logits by {np.abs(logits - base).max():.3f}")


if __name__ == "__main__":
  main()
