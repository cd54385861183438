"""`python -m tpu_reason.export --checkpoint DIR --out DIR [--adapter-only]`: Hugging Face format.

`--checkpoint` is a training run, its checkpoints/best|last dir or one step dir (the LoRA
and the config saved with it), or a plain model spec (then the base weights are exported:
e.g. an embedded GGUF as a Hugging Face base for the adapter). Writes, float32:

  merged (default)  model.safetensors (LoRA folded into the base weights), config.json,
                    generation_config.json (every stop id), tokenizer files and chat template;
                    transformers' AutoModelForCausalLM and `models.load(DIR)` both read it.
  --adapter-only    adapter_model.safetensors + adapter_config.json in PEFT's LoRA layout
                    (lora_A [r, in], lora_B [out, r], scale lora_alpha / r). Not for a run with
                    model.add_tokens: its trained rows and grown vocabulary need the merged export.

Gemma-derived exports carry a NOTICE with the Gemma Terms of Use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tpu_reason import config_io, lora as lora_lib, models, policy, runs
from tpu_reason.config import Config
from tpu_reason.errors import UserError, cli
from tpu_reason.models import convert, hf
from tpu_reason.models.transformer import as_computed
from tpu_reason.tree import flatten

FLAGS = {"--checkpoint": "checkpoint", "--out": "out", "--adapter-only": "adapter_only?"}
# PEFT names LoRA targets by the HF module: our projection -> module name suffix
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def merged_tensors(pol: policy.Policy) -> dict[str, np.ndarray]:
  """HF-named float32 tensors of the base weights with the LoRA folded in."""
  params = as_computed(pol.model.params, pol.model.cfg)  # a QLoRA run's adapter was trained on these
  if pol.lora is not None:
    params = lora_lib.merge(params, pol.lora, pol.lora_scale, pol.model.cfg.new_tokens)
  cfg = pol.model.cfg
  return convert.params_to_hf(cfg, params, norm_plus_one=convert.norm_plus_one(cfg))


def adapter_tensors(pol: policy.Policy) -> dict[str, np.ndarray]:
  """PEFT-named LoRA tensors: delta W_hf = scale * lora_B @ lora_A for every layer and target."""
  out = {}
  for name, ab in pol.lora["layers"].items():
    a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
    rank = a.shape[-1]
    for i in range(a.shape[0]):
      module = f"base_model.model.model.layers.{i}.{PEFT_MODULES[name]}"
      out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)  # [r, in]
      out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)  # [out, r]
  return out


def adapter_config(pol: policy.Policy) -> dict:
  """adapter_config.json for PEFT's LoraConfig."""
  lc = pol.lora_cfg
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": pol.base,
          "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
          "use_rslora": False, "inference_mode": True,
          "target_modules": sorted(PEFT_MODULES[n].split(".")[-1] for n in pol.lora["layers"])}


def _generation_config(model) -> dict:
  tok = model.tokenizer
  return {"bos_token_id": tok.bos_token_id, "eos_token_id": list(model.eos_ids),
          "pad_token_id": tok.pad_token_id, "do_sample": False}


def _save_tensors(tensors: dict[str, np.ndarray], path: Path):
  from safetensors.numpy import save_file

  # transformers refuses safetensors files without a framework tag
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def export(pol: policy.Policy, out: Path, adapter_only: bool = False) -> Path:
  """Write `pol` to `out` in Hugging Face (or, with adapter_only, PEFT) format."""
  model = pol.model
  if adapter_only:
    if pol.lora is None:
      raise UserError(f"{pol.source} has no LoRA to export: give a training run or checkpoint directory")
    if model.cfg.new_tokens:  # PEFT would need modules_to_save: whole embedding / head copies in the adapter
      raise UserError(f"{pol.source} added tokens (model.add_tokens), which a PEFT adapter cannot carry: "
                      "export the merged model (drop --adapter-only)")
  out.mkdir(parents=True, exist_ok=True)  # only once nothing is refused: no empty --out left behind
  if adapter_only:
    if pol.base != pol.run_config.model.spec:
      print(f"note: this adapter applies to {pol.base} merged (export that run first), not to the bare base model")
    _save_tensors(adapter_tensors(pol), out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(pol), indent=1))
  else:
    _save_tensors(merged_tensors(pol), out / "model.safetensors")
    hf_config = {**hf.config_to_hf(model.cfg), **{k: v for k, v in _generation_config(model).items() if k != "do_sample"}}
    (out / "config.json").write_text(json.dumps(hf_config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(_generation_config(model), indent=1))
    model.tokenizer.save_pretrained(str(out))  # tokenizer.json, its config and the chat template
  if notice := models.licence_notice(model.cfg):
    (out / "NOTICE").write_text(notice)
  (out / "tpu_reason_export.json").write_text(json.dumps({"source": pol.source, "adapter_only": adapter_only}, indent=1))
  return out


def run(checkpoint: str, out: str, adapter_only: bool = False) -> Path:
  """Load `checkpoint` (run dir, checkpoint dir or model spec) and export it to `out`."""
  runs.check_output(Path(out), "--out", ("tpu_reason_export.json",))
  pol = policy.load(checkpoint)  # float32: the export dtype
  path = export(pol, Path(out), adapter_only)
  n = sum(int(np.prod(np.shape(x))) for x in flatten(pol.lora if adapter_only else pol.model.params).values())
  print(f"exported {pol.source} ({'LoRA adapter' if adapter_only else 'merged model'}, {n:,} parameters) to {path}")
  return path


@cli
def main(argv: list[str] | None = None):
  _, flags = config_io.parse_args(Config, sys.argv[1:] if argv is None else argv, FLAGS)
  if not flags.get("checkpoint") or not flags.get("out"):
    raise UserError("usage: python -m tpu_reason.export --checkpoint DIR --out DIR [--adapter-only]")
  run(flags["checkpoint"], flags["out"], flags.get("adapter_only") == "true")


if __name__ == "__main__":
  main()
