"""`python -m tpu_reason.data [--config recipes/X.yaml] [key=value ...]`: inspect a dataset.

Prepares train/eval exactly as training would (same model tokenizer, tag schema
and buckets) and prints where every row went, token-length histograms, bucket
counts and a few examples with the loss-masked completion marked.
"""

from __future__ import annotations

import sys
import time

from tpu_reason import config, errors, models
from tpu_reason.data.buckets import Example
from tpu_reason.data.prepare import prepare, split_records

N_EXAMPLES = 3
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


@errors.cli
def main(argv: list[str] | None = None):
  cfg, _ = config.parse_args(config.Config, sys.argv[1:] if argv is None else argv)
  d = cfg.data
  start = time.time()
  splits = split_records(d)  # before the model: bad paths and tasks fail fast
  model = models.load(cfg.model.spec)
  train, _, reports = prepare(d, model, splits)
  what = f"task={d.task}" if d.source == "reasoning_gym" else f"path={d.path}"
  print(f"model={cfg.model.spec} source={d.source} {what} schema={d.schema}"
        f" size={d.size} eval_size={d.eval_size} P={d.max_prompt_tokens}"
        f" buckets={reports['train'].buckets}  ({time.time() - start:.1f}s)")
  for name in ("train", "eval"):
    print(reports[name])
  color = sys.stdout.isatty()
  legend = "dim = prompt, green = loss-masked completion" if color else "[[ ]] = loss-masked completion"
  print(f"\n{min(N_EXAMPLES, len(train))} train examples ({legend}):")
  for ex in train[:N_EXAMPLES]:
    print(show_example(ex, model.tokenizer, color))


if __name__ == "__main__":
  main()
