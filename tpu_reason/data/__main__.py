"""`python -m tpu_reason.data [--config recipes/X.yaml] [key=value ...]`: inspect a dataset.

Prepares train/eval exactly as training would (same model tokenizer, tag schema
and buckets) and prints where every row went, token-length histograms, bucket
counts, the reasoning:answer token ratios, and a few examples with the
loss-masked completion marked. `--generate N` also generates (greedy) for N eval
prompts and reports ROUGE-L of the generated reasoning against the reference trace.
"""

from __future__ import annotations

import sys
import time

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason import config, config_io, errors, models, scoring, tags
from tpu_reason.data import stats
from tpu_reason.data.examples import Example
from tpu_reason.data.prepare import prepare, split_records
from tpu_reason.tags import TagSchema

N_EXAMPLES = 3
FLAGS = {"--generate": "generate"}
DIM, LOSS, RESET = "\x1b[2m", "\x1b[1;32m", "\x1b[0m"


def show_example(ex: Example, tokenizer, color: bool) -> str:
  """Decoded tokens as the model sees them: prompt, then the loss-masked part.

  The marked span is decoded from the ids under `completion_mask`, so it shows
  exactly what is trained on, including the end-of-turn token.
  """
  prompt = tokenizer.decode(ex.prompt_tokens_P[ex.prompt_mask_P].tolist(), skip_special_tokens=False)
  loss = tokenizer.decode(ex.completion_tokens_C[ex.completion_mask_C].tolist(), skip_special_tokens=False)
  n_left = len(ex.prompt_mask_P) - ex.prompt_len
  n_right = ex.bucket - ex.completion_len
  head = (f"--- {ex.id}  prompt {ex.prompt_len}/{len(ex.prompt_mask_P)} tokens (left pad {n_left}),"
          f" completion {ex.completion_len}/{ex.bucket} tokens (right pad {n_right}), answer={ex.answer!r}")
  if color:
    body = f"{DIM}{prompt}{RESET}{LOSS}{loss}{RESET}"
  else:
    body = f"{prompt}[[{loss}]]"
  return f"{head}\n{body}"


def trace_summary(examples: Sequence[Example], tokenizer, schema: TagSchema) -> str:
  """The reasoning:answer token ratio line of one split."""
  pairs = [stats.completion_parts(schema, ex.completion_text) for ex in examples]
  return stats.format_ratio_summary(stats.ratio_summary(stats.trace_lengths(tokenizer, pairs)))


def rouge_summary(model, examples: Sequence[Example], schema: TagSchema, max_new_tokens: int) -> str:
  """Greedy generations for `examples`, their reasoning's ROUGE-L against the reference trace."""
  params = jax.tree.map(jnp.asarray, model.params)
  _, texts = scoring.generate_and_score(model, params, list(examples), schema, max_new_tokens=max_new_tokens)
  references = [stats.completion_parts(schema, ex.completion_text)[0] for ex in examples]
  scores = [s for s in stats.reasoning_rouge_l(schema, texts, references) if s is not None]
  if not scores:
    return f"  reasoning ROUGE-L: none of {len(examples)} eval rows has a reference trace"
  return (f"  reasoning ROUGE-L vs reference ({len(scores)} eval rows, greedy, {max_new_tokens} new tokens):"
          f" mean={np.mean(scores):.3f} median={np.median(scores):.3f} min={min(scores):.3f} max={max(scores):.3f}")


@errors.cli
def main(argv: list[str] | None = None):
  cfg, flags = config_io.parse_args(config.Config, sys.argv[1:] if argv is None else argv, FLAGS)
  n_generate = flags.get("generate", "0")
  if not n_generate.isdigit():
    raise errors.UserError(f"--generate takes a number of eval rows, got {n_generate!r}")
  d = cfg.data
  start = time.time()
  splits = split_records(d)  # before the model: bad paths and tasks fail fast
  model = models.load_for(cfg.model)  # the tokenizer training sees (model.add_tokens)
  train, evals, reports = prepare(d, model, splits)
  schema = tags.get_schema(d.schema)
  what = f"task={d.task}" if d.source == "reasoning_gym" else f"path={d.path}"
  print(f"model={cfg.model.spec} source={d.source} {what} schema={d.schema}"
        f" size={d.size} eval_size={d.eval_size} P={d.max_prompt_tokens}"
        f" buckets={reports['train'].buckets}  ({time.time() - start:.1f}s)")
  for name, examples in (("train", train), ("eval", evals)):
    print(reports[name])
    print(trace_summary(examples, model.tokenizer, schema))
  if int(n_generate):
    print(rouge_summary(model, evals[:int(n_generate)], schema, cfg.train.eval_max_new_tokens))
  color = sys.stdout.isatty()
  legend = "dim = prompt, green = loss-masked completion" if color else "[[ ]] = loss-masked completion"
  print(f"\n{min(N_EXAMPLES, len(train))} train examples ({legend}):")
  for ex in train[:N_EXAMPLES]:
    print(show_example(ex, model.tokenizer, color))


if __name__ == "__main__":
  main()
