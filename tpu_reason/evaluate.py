"""Generate on held-out prompts and score with the training rewards (one implementation)."""

from __future__ import annotations

import numpy as np

from tpu_reason import rewards, sampler
from tpu_reason.config import SamplingCfg
from tpu_reason.tags import TagSchema


def score_texts(schema: TagSchema, texts: list[str], answers: list[str], checkpoints: list) -> dict[str, float]:
  """Format / answer accuracy and mean reward of full assistant texts (primer included)."""
  kw = dict(answer=answers, checkpoints=checkpoints, schema=schema)
  prompts = [""] * len(texts)
  fmt = rewards.format_reward(prompts, texts, **kw)
  out = rewards.outcome_reward(prompts, texts, **kw)
  proc = rewards.process_reward(prompts, texts, **kw)
  return {
      "format_accuracy": float(np.mean([f == 1.0 for f in fmt])),
      "answer_accuracy": float(np.mean(out)),
      "reward/format": float(np.mean(fmt)),
      "reward/process": float(np.mean(proc)),
      "reward/outcome": float(np.mean(out)),
  }


def generate_and_score(model, params, examples, schema: TagSchema, *, lora=None, lora_scale=1.0,
                       max_new_tokens=256, batch_size=16, dtype=None) -> tuple[dict, list[str]]:
  """Greedy generation for `examples` (their padded prompts), scored with the rewards."""
  import jax.numpy as jnp

  texts, lengths = [], []
  sampling = SamplingCfg(max_new_tokens=max_new_tokens, temperature=0.0)
  for i in range(0, len(examples), batch_size):
    rows = examples[i:i + batch_size]
    tokens = np.stack([e.prompt_tokens_P for e in rows])
    mask = np.stack([e.prompt_mask_P for e in rows])
    gen = sampler.generate(params, model.cfg, model.tokenizer, tokens, mask, eos_ids=model.eos_ids,
                           sampling=sampling, lora=lora, lora_scale=lora_scale,
                           stop_strings=schema.stop_strings, dtype=dtype or jnp.float32)
    texts += [schema.primer + t for t in gen.texts]
    lengths += gen.lengths.tolist()
  scores = score_texts(schema, texts, [e.answer for e in examples], [list(e.checkpoints) for e in examples])
  scores["mean_completion_tokens"] = float(np.mean(lengths)) if lengths else 0.0
  return scores, texts
