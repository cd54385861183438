"""Regenerate golden logits with an independent reference: transformers + torch on CPU.

Not run in CI (torch is not a dependency). Run once after changing the prompt:
  pip install torch==2.13.0 && python tests/golden/make_golden.py
transformers dequantizes the same GGUF with its own loader and runs its own model code.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from tpu_reason import models

PROMPT = "The capital of France is Paris. Seven times eight equals"
POSITIONS = 8  # golden logits for the last POSITIONS tokens


def main():
  out_dir = Path(__file__).parent
  for spec in sys.argv[1:] or ["smollm2-135m", "gemma3-270m"]:
    m = models.load(spec)
    ids = m.encode(PROMPT)
    gguf = models._embedded_gguf(spec)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
      logits = ref(torch.tensor([ids])).logits[0, -POSITIONS:].float().numpy()
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    np.savez_compressed(
        out_dir / f"{spec}.npz", ids=np.array(ids), top5=top5,
        top5_logits=np.take_along_axis(logits, top5, -1), logits_sample=logits[:, :2048])
    print(spec, "ids", len(ids), "top1", m.tokenizer.decode(top5[-1, :1]))


if __name__ == "__main__":
  main()
