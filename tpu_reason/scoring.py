"""Generate on held-out prompts and score with the training rewards (one implementation).

`generate` decodes k samples per prompt (each prompt prefilled once: the sampler's
`group=k`), optionally with s1 budget forcing; `score_rows` applies every training reward
(`rewards.REWARDS`, the same parsers GRPO uses) to each completion; `summarize` turns those
into accuracy, format accuracy, pass@k, maj@k, mean rewards, token counts and the rate of
reasoning never closed. SFT's before/after table, GRPO and `python -m tpu_reason.eval` all
score through here.
"""

from __future__ import annotations

import collections

import jax.numpy as jnp
import numpy as np

from tpu_reason import rewards
from tpu_reason.config import BudgetCfg, SamplingCfg
from tpu_reason.data.batch import reward_columns
from tpu_reason.data.examples import Example, build_prompts
from tpu_reason.data.render import render
from tpu_reason.sampling import batched, sampler
from tpu_reason.sampling.batched import Completions
from tpu_reason.tags import TagSchema

# ------------------------------------------------------------------ prompts


def prompt_examples(records, model, schema: TagSchema, system_prompt: str = "") -> list[Example]:
  """Records as prompt-only examples, left-padded to one length (`sampler.prompt_width` of the longest).

  Unlike training data nothing is dropped: an eval row needs no target that fits a bucket.
  """
  longest = max((len(model.encode(render(r, model, schema, system_prompt)[0])) for r in records), default=1)
  examples, _ = build_prompts(records, model, schema, system_prompt=system_prompt,
                              max_prompt_tokens=sampler.prompt_width(longest), split="eval")
  return examples


# ------------------------------------------------------------------ generation


def generate(model, params, examples, schema: TagSchema, *, sampling: SamplingCfg, k: int = 1, lora=None,
             lora_scale: float = 1.0, budget: BudgetCfg | None = None, batch_size: int = 16,
             dtype=jnp.float32, desc: str | None = None) -> Completions:
  """k samples for each example's prompt, in equal batches (one compiled shape): `batched.generate_texts`."""
  prompts = (np.stack([e.prompt_tokens_P for e in examples]), np.stack([e.prompt_mask_P for e in examples])) \
      if len(examples) else []
  return batched.generate_texts(model, params, prompts, schema, sampling=sampling, k=k, batch_size=batch_size,
                                lora=lora, lora_scale=lora_scale, budget=budget, dtype=dtype, desc=desc)


# ------------------------------------------------------------------ scoring


def score_rows(schema: TagSchema, texts: list[str], /, answer: list[str], checkpoints: list,
               **columns: list) -> dict[str, np.ndarray]:
  """Every training reward (`rewards.REWARDS`) of each full assistant text, given the rows' columns
  (`reward_columns`), as {name: [R]}; NaN where a reward does not apply (process, for a row without
  checkpoints). schema and texts are positional-only: a data column may bear any other name."""
  kw = dict(columns, answer=list(answer), checkpoints=list(checkpoints), schema=schema)
  blank = [""] * len(texts)
  return {name: np.asarray(fn(blank, texts, **kw), np.float64) for name, fn in rewards.REWARDS.items()}


def _reward_means(scores: dict[str, np.ndarray]) -> dict[str, float]:
  """format_accuracy (strict format reward == 1) and the mean of every reward over the rows it applies to."""
  return {"format_accuracy": float(np.mean(scores["format"] == 1.0)),
          **{f"reward/{name}": float(np.nanmean(v)) for name, v in scores.items() if not np.isnan(v).all()}}


def majority(answers: list[str | None]) -> str | None:
  """The most common answer after `normalize_answer` (ties: first seen); None if none parsed."""
  votes = collections.Counter()
  first = {}
  for a in answers:
    key = rewards.normalize_answer(a)
    if key:
      votes[key] += 1
      first.setdefault(key, a)
  if not votes:
    return None
  top = max(votes.values())
  return next(first[key] for key in first if votes[key] == top)


def pass_at_k(correct_NxK: np.ndarray) -> float:
  """Fraction of prompts with at least one correct sample among their k."""
  return float(np.mean(np.any(correct_NxK, axis=1)))


def maj_at_k(answers_NxK: list[list[str | None]], golds: list[str]) -> float:
  """Fraction of prompts whose majority answer matches the gold one."""
  return float(np.mean([rewards.answers_match(majority(a), g) for a, g in zip(answers_NxK, golds)]))


def summarize(scores: dict[str, np.ndarray], answers: list[str | None], golds: list[str], k: int,
              lengths: np.ndarray, unclosed: np.ndarray) -> dict[str, float]:
  """Eval metrics of n*k prompt-major rows: `answers` parsed per row, `golds` per prompt."""
  n = len(golds)
  outcome_NxK = scores["outcome"].reshape(n, k)
  return {
      "n": n,
      "k": k,
      "accuracy": float(np.mean(outcome_NxK)),
      **_reward_means(scores),
      "pass@k": pass_at_k(outcome_NxK == 1.0),
      "maj@k": maj_at_k([answers[i * k:(i + 1) * k] for i in range(n)], golds),
      "mean_completion_tokens": float(np.mean(lengths)),
      "unclosed_rate": float(np.mean(unclosed)),
  }


def evaluate(model, params, examples, schema: TagSchema, *, sampling: SamplingCfg, k: int = 1, lora=None,
             lora_scale: float = 1.0, budget: BudgetCfg | None = None, batch_size: int = 16, dtype=jnp.float32,
             redact: bool = False, desc: str | None = None) -> tuple[dict, list[dict]]:
  """(metrics, one record per sample) for k samples per example; `redact` hides the reasoning text."""
  comps = generate(model, params, examples, schema, sampling=sampling, k=k, lora=lora, lora_scale=lora_scale,
                   budget=budget, batch_size=batch_size, dtype=dtype, desc=desc)
  rows = [e for e in examples for _ in range(k)]
  scores = score_rows(schema, comps.texts, **reward_columns(rows))
  parsed = [schema.parse(t) for t in comps.texts]
  # The sampler knows when forcing kept a block open; without forcing the text tells.
  unclosed = comps.budget.get("unclosed", np.array([not p.closed_reasoning for p in parsed]))
  metrics = summarize(scores, [p.answer for p in parsed], [e.answer for e in examples], k, comps.lengths, unclosed)
  for name in ("thinking_tokens", "forced_closes", "extensions", "loop_closes"):
    if name in comps.budget:
      metrics[f"mean_{name}"] = float(np.mean(comps.budget[name]))
  metrics["seconds"] = comps.seconds
  metrics["tokens_per_second"] = float(comps.lengths.sum()) / max(comps.seconds, 1e-9)
  samples = []
  for r, (e, text, p) in enumerate(zip(rows, comps.texts, parsed)):
    sample = {"id": e.id, "sample": r % k, "prompt": e.prompt_text,
              "completion": schema.redact(text) if redact else text, "answer": p.answer, "gold": e.answer,
              "scores": {name: float(v[r]) for name, v in scores.items() if not np.isnan(v[r])}, "tokens": int(comps.lengths[r]),
              "unclosed": bool(unclosed[r])}
    sample.update({name: np.asarray(v[r]).item() for name, v in comps.budget.items() if name != "unclosed"})
    samples.append(sample)
  return metrics, samples


# ------------------------------------------------------------------ training-time helpers


def score_texts(schema: TagSchema, texts: list[str], /, answer: list[str], checkpoints: list,
                **columns: list) -> dict[str, float]:
  """Format / answer accuracy and mean reward of full assistant texts (primer included)."""
  scores = score_rows(schema, texts, answer, checkpoints, **columns)
  unclosed = [not schema.parse(t).closed_reasoning for t in texts]
  return {**_reward_means(scores), "answer_accuracy": float(np.mean(scores["outcome"])),
          "unclosed_rate": float(np.mean(unclosed))}


def generate_and_score(model, params, examples, schema: TagSchema, *, lora=None, lora_scale=1.0,
                       max_new_tokens=256, batch_size=64, dtype=None) -> tuple[dict, list[str]]:
  """Greedy generation for `examples`, scored with the rewards (the trainers' held-out evals). Batches of up
  to 64 rows: fewer, fuller decode batches (112 rows go as 2 of 56, not 7 of 16)."""
  sampling = SamplingCfg(max_new_tokens=max_new_tokens, temperature=0.0)
  comps = generate(model, params, examples, schema, sampling=sampling, lora=lora, lora_scale=lora_scale,
                   batch_size=batch_size, dtype=dtype or jnp.float32)
  scores = score_texts(schema, comps.texts, **reward_columns(examples))
  scores["mean_completion_tokens"] = float(np.mean(comps.lengths)) if len(comps.lengths) else 0.0
  scores["rows"] = len(examples)
  return scores, comps.texts
