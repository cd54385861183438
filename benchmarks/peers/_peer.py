"""What the peer sides share: the exported model, the LoRA setup, torch facts and the RESULT line.

Runs under the peers venv (benchmarks/peers/setup.sh): torch CPU + transformers / PEFT / TRL,
never jax. The RESULT protocol is benchmarks/_sides.py's (stdlib-only at import).
"""

from __future__ import annotations

import ast
import importlib.metadata
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
MODEL_DIR = HERE / ".venv" / "smollm2-135m-hf"  # written by setup.sh (tpu_reason.export)
sys.path.insert(0, str(BENCH))

from _sides import emit, peak_rss_gib

__all__ = ["emit", "peak_rss_gib"]

# Our LoRA: rank 16, alpha 32 on the 7 projections of every layer (4,884,480 parameters on SmolLM2-135M)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OURS_LORA_PARAMS = 4_884_480


def bench_prompts() -> list[str]:
  """PROMPTS of benchmarks/bench_generate.py, read from its source: that script imports jax."""
  tree = ast.parse((BENCH / "bench_generate.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PROMPTS" for t in node.targets):
      return ast.literal_eval(node.value)
  raise RuntimeError("no PROMPTS in bench_generate.py")


def check_model_dir() -> None:
  if not (MODEL_DIR / "model.safetensors").exists():
    raise SystemExit(f"error: no exported model at {MODEL_DIR}: run bash benchmarks/peers/setup.sh")


def load_model():
  """SmolLM2-135M float32 from our export (the same weights our side loads)."""
  import torch
  from transformers import AutoModelForCausalLM

  check_model_dir()
  # `dtype` is transformers 5's name for the old `torch_dtype` argument (which now warns)
  return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)


def load_tokenizer():
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(MODEL_DIR)


def lora_config():
  from peft import LoraConfig

  return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                    task_type="CAUSAL_LM")


def trainable_params(model) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def versions() -> dict:
  import torch

  out = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "trl", "accelerate")}
  return {**out, "torch_threads": torch.get_num_threads(), "torch_cuda": torch.version.cuda}


def print_versions(side: str) -> dict:
  v = versions()
  print(f"[{side}] torch {v['torch']} ({v['torch_threads']} threads, cuda {v['torch_cuda']}), transformers "
        f"{v['transformers']}, peft {v['peft']}, trl {v['trl']}, accelerate {v['accelerate']}", flush=True)
  return v


def median(xs: list[float]) -> float:
  return float(statistics.median(xs))


class StepClock:
  """A transformers TrainerCallback's step hooks: seconds from on_step_begin to on_step_end.

  Both hooks wrap the whole optimizer step (generation too, for GRPO: it runs inside training_step);
  only the data loader's fetch of the batch falls before on_step_begin.
  """

  def __init__(self, on_step=None):
    self.on_step = on_step  # called with each step's seconds, at its end
    self.times: list[float] = []
    self.logs: list[dict] = []
    self._t = 0.0

  def callback(self):
    from transformers import TrainerCallback

    clock = self

    class _Clock(TrainerCallback):
      def on_step_begin(self, args, state, control, **kw):
        clock._t = time.perf_counter()

      def on_step_end(self, args, state, control, **kw):
        clock.times.append(time.perf_counter() - clock._t)
        if clock.on_step:
          clock.on_step(clock.times[-1])
        print(f"  step {len(clock.times) - 1}: {clock.times[-1]:.1f} s", flush=True)

      def on_log(self, args, state, control, logs=None, **kw):
        clock.logs.append(dict(logs or {}))

    return _Clock()
