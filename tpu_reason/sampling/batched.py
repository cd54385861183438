"""Fixed-shape batched generation: k samples for each of many prompts, as full assistant texts.

The one path eval (`scoring.generate`) and curation (`curate.difficulty.ModelSolver`) sample
through: prompts left-padded to one `sampler.prompt_width` with `model.pad_id`, cut into batches
of one size (the last filled up with copies of its first prompt, whose samples are dropped), each
prompt prefilled once and decoded k times (`group=k`), batch b keyed `fold_in(key, first_batch + b)`,
the schema's primer put back in front of every text. GRPO's rollout samples one mesh-placed batch
under its own key and trains on the token arrays, so it calls `sampler.generate` itself; chat and
`python -m tpu_reason.generate` stream one prompt through `on_chunk`, and do too.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason.config import BudgetCfg, SamplingCfg
from tpu_reason.sampling import budget as budget_lib, sampler
from tpu_reason.tags import TagSchema

# Per-row counters the sampler's Generation carries when given a tag schema.
BUDGET_FIELDS = ("thinking_tokens", "unclosed", "forced_closes", "extensions", "loop_closes")


@dataclasses.dataclass
class Completions:
  """k completions per prompt, prompt-major: row i*k + j is sample j of prompt i."""

  texts: list[str]  # full assistant texts (primer included), as the rewards expect
  lengths: np.ndarray  # generated tokens per row
  k: int
  seconds: float
  budget: dict[str, np.ndarray]  # the BUDGET_FIELDS the sampler reported (empty without forcing)


def budget_kwargs(budget: BudgetCfg | None, schema: TagSchema) -> dict:
  """The sampler arguments for budget forcing (none without a cap or extensions)."""
  return {"budget": budget, "schema": schema} if budget_lib.active(budget) else {}


def pad_prompts(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_NxP, mask_NxP): token-id lists left-padded to the `prompt_width` of the longest, or an
  already left-padded (tokens, mask) pair as it is."""
  if isinstance(prompts, tuple):
    return prompts
  ids = [list(p) for p in prompts]
  return sampler.left_pad(ids, sampler.prompt_width(max(len(x) for x in ids)), pad_id)


def generate_texts(model, params, prompts: Sequence[Sequence[int]] | tuple[np.ndarray, np.ndarray],
                   schema: TagSchema, *, sampling: SamplingCfg, k: int = 1, batch_size: int, fill: bool = False,
                   key: jax.Array | None = None, first_batch: int = 0, lora=None, lora_scale: float = 1.0,
                   budget: BudgetCfg | None = None, dtype=jnp.float32, mesh=None,
                   desc: str | None = None) -> Completions:
  """k samples for each prompt (token-id lists, or a left-padded (tokens_NxP, mask_NxP) pair).

  Batches: with `fill`, `batch_size` rows each (one shape across calls of any size); without, the
  fewest batches of at most `batch_size`, all of one size (112 rows at 64 go as 2 of 56, not 64 + 48).
  Batch b samples with `fold_in(key, first_batch + b)`, `key` defaulting to `sampling.seed`'s.
  `mesh` is set around generation when given; `desc` shows a progress bar.
  """
  from tqdm.auto import tqdm

  t0 = time.perf_counter()
  n = len(prompts[0]) if isinstance(prompts, tuple) else len(prompts)
  if n == 0:
    return Completions([], np.zeros(0, np.int32), k, 0.0, {})
  tokens, mask = pad_prompts(prompts, model.pad_id)
  n_batches = -(-n // batch_size)
  size = batch_size if fill else -(-n // n_batches)
  extra = budget_kwargs(budget, schema)
  root = jax.random.key(sampling.seed) if key is None else key
  texts, lengths, counters = [], [], collections.defaultdict(list)
  for b in tqdm(range(n_batches), desc=desc, disable=desc is None, leave=False):
    rows = slice(b * size, (b + 1) * size)
    batch_tokens, batch_mask = tokens[rows], mask[rows]
    keep = len(batch_tokens) * k
    filler = size - len(batch_tokens)  # copies of the first prompt keep the batch shape fixed
    batch_tokens = np.concatenate([batch_tokens, np.repeat(batch_tokens[:1], filler, 0)])
    batch_mask = np.concatenate([batch_mask, np.repeat(batch_mask[:1], filler, 0)])
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():  # each chip decodes its rows
      gen = sampler.generate(params, model.cfg, model.tokenizer, batch_tokens, batch_mask, eos_ids=model.eos_ids,
                             sampling=sampling, key=jax.random.fold_in(root, first_batch + b), lora=lora,
                             lora_scale=lora_scale, group=k, stop_strings=schema.stop_strings, dtype=dtype,
                             pad_id=model.pad_id, **extra)
    texts += [schema.primer + t for t in gen.texts[:keep]]
    lengths.append(np.asarray(gen.lengths[:keep]))
    for name in BUDGET_FIELDS:
      if getattr(gen, name) is not None:  # reported with a tag schema, i.e. when forcing
        counters[name].append(np.asarray(getattr(gen, name))[:keep])
  budget_rows = {name: np.concatenate(v) for name, v in counters.items()}
  return Completions(texts, np.concatenate(lengths), k, time.perf_counter() - t0, budget_rows)
