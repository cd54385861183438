"""`python -m tpu_reason.grpo [--config recipes/X.yaml] [key=value ...]`: GRPO on LoRA adapters.

One step: sample G completions per prompt (each prompt prefilled once, a fresh key per step),
score them with the format / process / outcome rewards, turn the rewards into group-relative
advantages, then make `num_iterations` passes of clipped-surrogate + β·k3-KL updates over
mini-batches. The policy is the init weights (base, or base with the SFT adapter merged in)
plus a fresh adapter; the reference is the same weights with the adapter off — one copy.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tpu_reason import (config, lora as lora_lib, losses, mesh as mesh_lib, models, rewards, runs, scoring,
                        sharding as sharding_lib)
from tpu_reason import distributed, loop, tags
from tpu_reason import train as train_lib
from tpu_reason.config import Config, GrpoCfg
from tpu_reason.data import loader, prepare
from tpu_reason.data.batch import Batch, Collated, RolloutBatch, reward_columns
from tpu_reason.data.prepare import prepare_prompts, split_records
from tpu_reason.errors import UserError, cli
from tpu_reason.sampling import layout, sampler

# --------------------------------------------------------------------------- pure pieces


ZERO_STD = 1e-6  # a group whose rewards' std is below this has nothing to learn from


def rollout_key(seed: int, step: int, round: int = 0) -> jax.Array:
  """The sampling key of step `step` (and of its resample `round` > 0 with dynamic sampling): fresh every
  step and round, the same on a resumed run."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  return jax.random.fold_in(key, round) if round else key


def reward_metrics(total: np.ndarray, parts: dict[str, list[float | None]], group: int,
                   ddof: int = 0) -> dict[str, float]:
  """TRL-named reward statistics of one rollout batch (rows grouped by prompt); `reward_std` is
  the mean of the groups' stds (TRL's figure when ddof=1). A reward's mean and std cover the rows
  it applies to (not None); one that skipped rows also logs how many it scored, `rewards/<fn>/rows`."""
  r = np.asarray(total, np.float64).reshape(-1, group)
  std = r.std(axis=1, ddof=ddof)
  out = {"reward": float(r.mean()), "reward_std": float(std.mean()),
         "frac_reward_zero_std": float(np.mean(std < ZERO_STD))}
  for name, values in parts.items():
    scored = applicable(values)
    if len(scored) < len(values):
      out[f"rewards/{name}/rows"] = float(len(scored))
    if scored:  # no NaN for a reward that applied to no row
      out[f"rewards/{name}/mean"] = float(np.mean(scored))
      out[f"rewards/{name}/std"] = float(np.std(scored))
  return out


def applicable(values: list[float | None]) -> list[float]:
  """The values of the rows a reward applies to (None: it does not)."""
  return [v for v in values if v is not None]


def advantage_rewards(total_B, parts: dict[str, list[float | None]], g: GrpoCfg) -> np.ndarray:
  """The per-completion reward the advantages come from: the weighted total (`sum`), or the weighted
  sum of the rewards each normalised within its group (`normalize_each`)."""
  if g.reward_aggregation == "sum":
    return np.asarray(total_B, np.float32)
  # a reward skips whole groups (one prompt, one set of columns): as 0s there it normalises to 0
  r_KxB = np.array([[0.0 if v is None else v for v in parts[name]] for name in g.rewards], np.float32)
  return np.asarray(losses.normalize_each(r_KxB, g.reward_weights, g.group, ddof=g.std_ddof), np.float32)


def informative_groups(rewards_B, group: int, ddof: int = 0) -> np.ndarray:
  """bool[groups]: whether a group's rewards differ (std >= ZERO_STD, the tolerance of frac_reward_zero_std).
  The others have advantages 0 in every scaling: no gradient."""
  return np.asarray(rewards_B, np.float64).reshape(-1, group).std(axis=1, ddof=ddof) >= ZERO_STD


def keep_groups(informative, prompts: list[str], taken: set[str], room: int) -> np.ndarray:
  """bool[groups]: which groups of one round join the step's batch: the informative ones, in order, whose
  prompt is not in it yet (`taken`, nor earlier in this round), at most `room` of them."""
  keep, taken = np.zeros(len(prompts), bool), set(taken)
  for i, (ok, prompt) in enumerate(zip(informative, prompts)):
    if ok and prompt not in taken and room > 0:
      keep[i], room = True, room - 1
      taken.add(prompt)
  return keep


def fill_batch(rounds: list, keep: list[np.ndarray], prompts: int, group: int):
  """One batch of exactly `prompts` groups (rows of `group`) from several rounds' arrays (each a pytree of the
  same structure holding a `RolloutBatch`, e.g. (arrays, rewards_B)): the kept groups in order, widths padded
  to the widest round (`_BxP` fields on the left, the others on the right, False / 0), then, for any group
  still missing, a filler: the first group's rows with completion mask off and advantage 0, so it adds
  nothing to the loss, its gradient or the masked metrics, and the batch keeps its one shape."""
  kept = sum(int(k.sum()) for k in keep)
  assert kept <= prompts, (kept, prompts)
  fillers = np.tile(np.arange(group), prompts - kept)

  def one(path, first, *rest):
    parts = [a[np.repeat(k, group)] for a, k in zip((first, *rest), keep)] + [first[fillers]]
    if first.ndim == 2:
      width = max(p.shape[1] for p in parts)
      left = getattr(path[-1], "name", "").endswith("_BxP")
      parts = [_pad_columns(p, width, left=left) for p in parts]
    return np.concatenate(parts)

  out = jax.tree_util.tree_map_with_path(one, *rounds)
  for arrays in jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, RolloutBatch)):
    if isinstance(arrays, RolloutBatch):
      arrays.completion_mask_BxC[kept * group:] = False
      arrays.advantages_B[kept * group:] = 0.0
  return out


def _pad_columns(x: np.ndarray, width: int, left: bool) -> np.ndarray:
  pad = (width - x.shape[1], 0) if left else (0, width - x.shape[1])
  return np.pad(x, ((0, 0), pad))


def completion_metrics(lengths: np.ndarray, truncated: np.ndarray) -> dict[str, float]:
  return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
          "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.mean())}


@dataclasses.dataclass
class Round:
  """One rollout round: a prompt batch sampled G times each, scored, with its advantages."""

  batch: Collated  # the prompt batch (ids, prompt texts, answers), its shared left padding trimmed
  arrays: RolloutBatch  # the train arrays, advantages_B included (not yet the stored log-probs)
  rewards_B: np.ndarray  # what the advantages come from: advantage_rewards + the overlong penalty
  total_B: np.ndarray  # the logged reward: the weighted total + the overlong penalty
  parts: dict  # each reward's values per row (None: it does not apply), `overlong` too when on
  gen: sampler.Generation
  texts: list[str]  # the completions, primer first


def rollout_metrics(rounds: list[Round], g: GrpoCfg) -> dict[str, float]:
  """Reward and completion statistics over every row the rounds drew; rollout time and speed of the first."""
  total = np.concatenate([r.total_B for r in rounds])
  parts = {name: [v for r in rounds for v in r.parts[name]] for name in rounds[0].parts}
  lengths = np.concatenate([r.gen.lengths for r in rounds])
  truncated = np.concatenate([r.gen.truncated for r in rounds])
  return {**reward_metrics(total, parts, g.group, g.std_ddof), **completion_metrics(lengths, truncated),
          "tokens_per_s/rollout": rounds[0].gen.tokens_per_second, "time/rollout": rounds[0].gen.seconds}


class Stream:
  """Prompt batches in order, counting those handed out: `position` is where a resumed run picks them up
  (the checkpoint's data_position; more than one batch a step with dynamic sampling)."""

  def __init__(self, batches, position: int):
    self.batches, self.position = batches, position

  def __iter__(self):
    return self

  def __next__(self) -> Collated:
    batch = next(self.batches)
    self.position += 1
    return batch


def loss(lora, params, mb, *, cfg, g: GrpoCfg, lora_scale, dtype, remat, chunk, on_policy: bool):
  """Clipped surrogate + β·k3 KL over one micro-batch, aggregated as `g.loss`; aux for logging."""
  logp = losses.completion_logprobs(params, cfg, mb, lora=lora, lora_scale=lora_scale, dtype=dtype, remat=remat,
                                    chunk=chunk, temperature=g.sampling.temperature)
  # μ = 1: the rollout policy is the current one, so its log-probs are these (ratio 1)
  old = jax.lax.stop_gradient(logp) if on_policy else mb.old_logp_BxC
  mask = mb.completion_mask_BxC
  sequence = g.importance_level == "sequence"  # GSPO's ratios sit near 1: they have their own clip range
  eps = (g.gspo_epsilon_low, g.gspo_epsilon_high) if sequence else (g.epsilon_low, g.epsilon_high)
  per_token, low, high = losses.clipped_surrogate(logp, old, mb.advantages_B, *eps, level=g.importance_level,
                                                  mask_BxT=mask)
  if g.rollout_correction == "tis":  # the policy term only, as TRL does: the KL is the trainer's own
    per_token = per_token * losses.truncated_is_weight(old, mb.sampler_logp_BxC, g.rollout_correction_cap)
  kl = losses.kl_k3(logp, mb.ref_logp_BxC) if g.beta else jnp.zeros_like(logp)
  # dr_grpo divides by the cap, not by this step's trimmed width: the same batch, the same loss
  total = losses.aggregate(per_token + g.beta * kl, mask, g.loss, max_tokens=g.sampling.max_new_tokens,
                           num_tokens=mb.num_tokens_B[0])
  gap = jnp.abs(old - mb.sampler_logp_BxC)  # the trainer's rollout-policy log-probs against the sampler's
  aux = {"kl": losses.masked_mean(kl, mask), "clip_ratio/low_mean": losses.masked_mean(low, mask),
         "clip_ratio/high_mean": losses.masked_mean(high, mask), "rollout/logp_diff/mean": losses.masked_mean(gap, mask),
         "rollout/logp_diff/max": jnp.max(jnp.where(mask, gap, 0.0))}
  return total, aux


def _logprobs(lora, params, batch, *, cfg, lora_scale, dtype, chunk, temperature):
  return losses.completion_logprobs(params, cfg, batch, lora=lora, lora_scale=lora_scale, dtype=dtype, chunk=chunk,
                                    temperature=temperature)


def trim_prompts(batch: Collated) -> Collated:
  """Cut the left padding all prompts share, to `sampler.prompt_width`: prefill and training skip it."""
  a = batch.arrays
  width = sampler.prompt_width(int(a.prompt_mask_BxP.sum(1).max()), a.prompt_mask_BxP.shape[1])
  arrays = dataclasses.replace(a, prompt_tokens_BxP=a.prompt_tokens_BxP[:, -width:],
                               prompt_mask_BxP=a.prompt_mask_BxP[:, -width:])
  return dataclasses.replace(batch, arrays=arrays)


def updates_per_step(g: GrpoCfg) -> int:
  return g.num_iterations * (g.prompts // g.mini)


def make_optimizer(g: GrpoCfg):
  """`grpo.optim` over `grpo.steps`, each step `updates_per_step` optimizer updates."""
  return train_lib.make_optimizer(g.optim, g.steps, updates_per_step(g))


# --------------------------------------------------------------------------- orchestration


@dataclasses.dataclass
class Trainer:
  """What `run` builds once: model, prompts, mesh, jitted functions."""

  cfg: Config
  out: Path
  model: models.Model
  schema: tags.TagSchema
  train: list
  warmup: list  # curriculum prompts (served for the first grpo.curriculum_steps steps)
  eval: list
  params: Any
  mesh: Any
  optimizer: optax.GradientTransformation
  step_fn: Any
  logp_fn: Any
  lora_scale: float
  state_sharding: Any
  init: str  # "base" or the run dir whose adapter is merged into `params`
  stream: Stream | None = dataclasses.field(default=None, repr=False)  # set by `batches`
  noted: bool = False  # the decode layout's fallback note was printed
  kind = "grpo"
  lr_key = "grpo.optim.lr"
  samples_file = "rollouts.jsonl"
  plot = ([("train", "reward"), ("train", "rewards/format/mean"), ("train", "rewards/process/mean"),
           ("train", "rewards/outcome/mean"), ("eval", "reward"), ("train", "completions/mean_length"),
           ("train", "kl")], "rewards.png")

  @property
  def dtype(self):
    return jnp.dtype(self.cfg.model.dtype)

  def step(self, state, batch: Collated, step: int):
    """Rollout, scoring and updates: (state, metrics row, the step's completions)."""
    state, m, drawn = grpo_step(self, state, batch, step)
    g = self.cfg.grpo
    m["lr"] = float(train_lib.schedule(g.optim, g.steps, updates_per_step(g))(int(state.step) - 1))
    return state, m, self.record(**drawn)

  def record(self, ids: list, texts: list[str], kept: list[bool] | None = None) -> dict:
    """The step's line of rollouts.jsonl (with dynamic sampling every group drawn, and whether it was kept);
    `redact_thoughts` keeps only each reasoning's length."""
    if self.cfg.redact_thoughts:
      texts = [self.schema.redact(t) for t in texts]
    return {"ids": ids, "completions": texts, **({} if kept is None else {"kept": kept})}

  def held_out(self, lora, full: bool) -> dict:
    return self.evaluate(lora)

  def completed(self, state) -> int | None:
    """Whole GRPO steps in `state` (None between the updates of one step: not exactly resumable)."""
    done, partial = divmod(int(state.step), updates_per_step(self.cfg.grpo))
    return None if partial else done

  def postfix(self, row: dict) -> dict:
    return {"reward": f"{row['reward']:.2f}", "kl": f"{row['kl']:.3f}", "len": f"{row['completions/mean_length']:.0f}"}

  def table(self, before: dict, after: dict) -> str:
    return loop.table(before, after, list(after))

  @property
  def on_policy(self) -> bool:
    """One update per rollout: the sampling policy is the one being updated (ratio 1)."""
    return updates_per_step(self.cfg.grpo) == 1

  def place(self, arrays):
    """Rows over the data axes; on several hosts each process hands jax only its own rows."""
    return distributed.global_batch(arrays, self.mesh)

  def batches(self, start: int) -> Stream:
    """The prompt stream from batch `start` on (the saved data_position): one batch a step, more with dynamic
    sampling, whose resample rounds draw from this same stream."""
    self.stream = Stream(self.prompt_batches(start), start)
    return self.stream

  @property
  def data_position(self) -> int | None:
    """Prompt batches drawn so far (after a step: where a resumed run starts reading)."""
    return None if self.stream is None else self.stream.position

  def prompt_batches(self, start: int):
    """Prompt batches from batch `start` of the stream on: the first grpo.curriculum_steps from the curriculum
    (one a step unless dynamic sampling draws more), then the main task."""
    g = self.cfg.grpo
    if g.max_completions:  # the sampling budget, in prompt batches
      yield from _take(self.unbudgeted_batches(start), g.max_completions // (g.prompts * g.group) - start)
    else:
      yield from self.unbudgeted_batches(start)

  def unbudgeted_batches(self, start: int):
    g, seed = self.cfg.grpo, self.cfg.train.seed
    if start < g.curriculum_steps:
      yield from _take(loader.batches(self.warmup, g.prompts, seed=seed, start_step=start), g.curriculum_steps - start)
    yield from loader.batches(self.train, g.prompts, seed=seed, start_step=max(0, start - g.curriculum_steps))

  def sample(self, lora, batch: Collated, step: int) -> tuple[RolloutBatch, dict, dict]:
    """The step's train arrays, metrics, and what rollouts.jsonl records: one rollout, or with
    grpo.dynamic_sampling as many rounds of fresh prompts as it takes to fill the batch."""
    if self.cfg.grpo.dynamic_sampling:
      return self.dynamic_rollout(lora, batch, step)
    arrays, metrics, texts = self.rollout(lora, batch, step)
    return arrays, metrics, {"ids": batch.id, "texts": texts}

  def timed_weights(self, lora) -> tuple[layout.Weights, dict]:
    """`decode_weights` and the time it took (`time/decode_weights`: the merge and its one all-gather)."""
    t0 = time.perf_counter()
    weights = self.decode_weights(lora)
    jax.block_until_ready(weights.params)
    return weights, {"time/decode_weights": time.perf_counter() - t0}

  def decode_weights(self, lora) -> layout.Weights:
    """What the sampler reads for the policy `lora`: the merged decode copy (`sampling.layout`), or the training
    layout when mesh.decode_layout says so or the copy does not fit (said once)."""
    m, g = self.model, self.cfg.grpo
    rows = g.prompts * g.group
    kv = layout.cache_bytes(m.cfg, rows, self.cfg.data.max_prompt_tokens + g.sampling.max_new_tokens, self.dtype,
                            self.mesh)
    weights, note = layout.build(self.params, lora, m.cfg, self.mesh, lora_scale=self.lora_scale, dtype=self.dtype,
                                 mode=self.cfg.mesh.decode_layout, extra_bytes=kv)
    if note and not self.noted:
      print(note, flush=True)
      self.noted = True
    return weights

  def rollout(self, lora, batch: Collated, step: int) -> tuple[RolloutBatch, dict, list[str]]:
    """Sample, score and compute advantages: (train arrays, metrics, completions)."""
    weights, timing = self.timed_weights(lora)
    r = self.sample_round(weights, batch, step)
    return r.arrays, {**rollout_metrics([r], self.cfg.grpo), **timing}, r.texts

  def dynamic_rollout(self, lora, batch: Collated, step: int) -> tuple[RolloutBatch, dict, dict]:
    """DAPO's dynamic sampling: keep the informative groups of `batch`, then of further batches of the stream
    (each round its own key), until grpo.prompts are kept or grpo.max_resample_rounds extra rounds are spent;
    a batch still short is filled with masked groups (`fill_batch`). Advantages are those of the kept rows."""
    g = self.cfg.grpo
    weights, timing = self.timed_weights(lora)  # once: every round samples the same policy
    rounds, keep, taken, extra = [], [], set(), 0.0
    while True:
      t0 = time.perf_counter()
      if rounds:
        batch = next(self.stream, None)  # fresh prompts, further along the stream
        if batch is None:  # grpo.max_completions is spent: train on what was kept
          break
      r = self.sample_round(weights, batch, step, len(rounds))
      k = keep_groups(informative_groups(r.rewards_B, g.group, g.std_ddof), r.batch.prompt_text, taken,
                      g.prompts - len(taken))
      taken |= {p for p, kept in zip(r.batch.prompt_text, k) if kept}
      extra += (time.perf_counter() - t0) if rounds else 0.0
      rounds.append(r)
      keep.append(k)
      if len(taken) == g.prompts or len(rounds) > g.max_resample_rounds:
        break
    arrays, rewards_B = fill_batch([(r.arrays, r.rewards_B) for r in rounds], keep, g.prompts, g.group)
    n = len(taken) * g.group
    if n:  # the same per group; with scale_rewards=batch, one std over the rows that train
      arrays.advantages_B[:n] = losses.group_advantages(rewards_B[:n], g.group, scale=g.scale_rewards,
                                                           ddof=g.std_ddof)
    drawn = g.prompts * len(rounds)
    metrics = {**rollout_metrics(rounds, g), **timing, "time/resample": extra, "dynamic/groups_drawn": float(drawn),
               "dynamic/groups_kept": float(len(taken)), "dynamic/groups_dropped": float(drawn - len(taken)),
               "dynamic/rounds": float(len(rounds) - 1)}
    record = {"ids": [i for r in rounds for i in r.batch.id], "texts": [t for r in rounds for t in r.texts],
              "kept": [bool(x) for k in keep for x in k]}
    return arrays, metrics, record

  def sample_round(self, weights: layout.Weights, batch: Collated, step: int, round: int = 0) -> Round:
    """Sample G completions per prompt (the key of `step` and `round`), score them, compute advantages."""
    g, m = self.cfg.grpo, self.model
    batch = trim_prompts(batch)
    a = batch.arrays
    prompts = self.place((a.prompt_tokens_BxP, a.prompt_mask_BxP))
    with jax.set_mesh(self.mesh):  # each chip decodes its own rows
      gen = sampler.generate(weights.params, m.cfg, m.tokenizer, *prompts, eos_ids=m.eos_ids, sampling=g.sampling,
                             key=rollout_key(g.sampling.seed, step, round), group=g.group,
                             stop_strings=self.schema.stop_strings, dtype=self.dtype, pad_id=m.pad_id,
                             **weights.kwargs())
    texts = [self.schema.primer + t for t in gen.texts]
    rep = lambda xs: [x for x in xs for _ in range(g.group)]  # noqa: E731
    columns = {name: rep(values) for name, values in batch.columns.items()}  # one value per completion
    total, parts = rewards.score(rep(batch.prompt_text), texts, dict(zip(g.rewards, g.reward_weights)),
                                 **columns, schema=self.schema.name)
    overlong = (np.asarray(losses.overlong_penalty(gen.lengths, g.sampling.max_new_tokens, g.overlong_buffer,
                                                   g.overlong_penalty), np.float32)
                if g.overlong_buffer else np.zeros(len(texts), np.float32))
    rewards_B = advantage_rewards(total, parts, g) + overlong
    adv = losses.group_advantages(rewards_B, g.group, scale=g.scale_rewards, ddof=g.std_ddof)
    total = np.asarray(total, np.float32) + overlong
    if g.overlong_buffer:  # logged like a reward: rewards/overlong/mean
      parts = {**parts, "overlong": overlong.tolist()}
    mask = gen.mask & ~(gen.truncated[:, None] & g.mask_truncated_completions)
    width = sampler.pow2_bucket(int(gen.lengths.max()), gen.tokens.shape[1])  # right padding nobody uses
    arrays = RolloutBatch(np.repeat(a.prompt_tokens_BxP, g.group, 0), np.repeat(a.prompt_mask_BxP, g.group, 0),
                          gen.tokens[:, :width], mask[:, :width], advantages_B=np.asarray(adv, np.float32),
                          sampler_logp_BxC=gen.logprobs[:, :width])
    return Round(batch, arrays, rewards_B, total, parts, gen, texts)

  def score_logprobs(self, lora, arrays: Batch) -> np.ndarray:
    """Log-probs of the sampled completions under `lora` (None = reference), micro-batch by micro-batch."""
    rows = self.cfg.grpo.micro_batch * self.cfg.grpo.group
    tokens = arrays.tokens()
    out = [self.logp_fn(lora, self.params, self.place(tokens.rows(i, i + rows)))
           for i in range(0, len(tokens.prompt_tokens_BxP), rows)]
    return np.concatenate(distributed.to_host(out))

  def update(self, state, arrays: RolloutBatch) -> tuple[Any, dict]:
    """`num_iterations` passes of mini-batch updates over one rollout batch."""
    g = self.cfg.grpo
    rows, accum = g.mini * g.group, g.mini // g.micro_batch
    metrics = []
    for _ in range(g.num_iterations):
      for i in range(0, len(arrays.advantages_B), rows):
        mb = arrays.rows(i, i + rows)
        # dapo's token-mean spans the mini-batch: each micro-slice divides by its share of tokens
        mb = dataclasses.replace(mb, num_tokens_B=np.full(rows, mb.completion_mask_BxC.sum() / accum, np.float32))
        state, m = self.step_fn(state, self.params, self.place(mb))
        metrics.append(m)
    metrics = jax.device_get(metrics)
    reduce = lambda k: np.max if k.endswith("/max") else np.mean  # noqa: E731
    return state, {k: float(reduce(k)([m[k] for m in metrics])) for k in metrics[0]}

  def evaluate(self, lora) -> dict:
    """Greedy completions on held-out prompts: accuracy, format, mean of each reward, length."""
    t, g = self.cfg.train, self.cfg.grpo
    rows = self.eval[: t.eval_generate]
    if not rows:
      return {}
    w = self.decode_weights(lora)
    with jax.set_mesh(self.mesh):
      scores, texts = scoring.generate_and_score(self.model, w.params, rows, self.schema, lora=w.lora,
                                                  lora_scale=w.lora_scale, max_new_tokens=t.eval_max_new_tokens,
                                                  dtype=self.dtype)
    total, parts = rewards.score([r.prompt_text for r in rows], texts, dict(zip(g.rewards, g.reward_weights)),
                                 **reward_columns(rows), schema=self.schema.name)
    return {"accuracy": scores["answer_accuracy"], "format_accuracy": scores["format_accuracy"],
            "reward": float(np.mean(total)),
            **{f"reward/{k}": float(np.mean(applicable(v))) for k, v in parts.items() if applicable(v)},
            "mean_completion_tokens": scores["mean_completion_tokens"], "rows": scores["rows"]}


def _take(it, n: int):
  for _, x in zip(range(n), it):
    yield x


def resolve_init(cfg: Config) -> str:
  """grpo.init -> "base" or an absolute run dir (auto: the latest finished SFT run of this model)."""
  init = cfg.grpo.init
  if init == "base":
    return "base"
  if init == "auto":
    found = runs.latest_finished(cfg.model.spec, "sft")
    if found is None:
      print(f"note: no finished SFT run of {cfg.model.spec} under {runs.RUNS}/; starting GRPO from the base model "
            "(run `python -m tpu_reason.sft` first for a model that already writes the tags)")
      return "base"
    print(f"starting from the SFT run {found}")
    return str(found.resolve())
  path = Path(init)
  runs.info(path)  # a clear error when it is not a run dir
  return str(path.resolve())


def load_prompts(cfg: Config, model) -> tuple[list, list, list]:
  """(train, curriculum, eval) prompt examples; reports printed."""
  data = dataclasses.replace(cfg.data, task=cfg.grpo.task) if cfg.grpo.task else cfg.data
  train, evals, reports = prepare_prompts(data, model)
  warmup = []
  for task in cfg.grpo.curriculum:
    data = dataclasses.replace(cfg.data, task=task, source="reasoning_gym", eval_size=0)
    rows, _, rep = prepare_prompts(data, model, split_records(data))
    warmup += rows
    reports[f"curriculum:{task}"] = rep["train"]
  for r in reports.values():
    print(r.summary())
  return train, warmup, evals


def build(cfg: Config) -> Trainer:
  """Load model (with the init adapter merged), prompts, mesh and the jitted functions."""
  g = cfg.grpo
  out = cfg.resolved_output_dir("grpo")
  schema = tags.get_schema(cfg.data.schema)
  # a resumed run keeps the weights it started from, whatever `auto` would pick today
  resuming = (out / "run.json").exists() and cfg.train.resume != "none"
  init = runs.info(out).get("init", "base") if resuming else resolve_init(cfg)
  runs.check_init(init, cfg.model)
  if cfg.grpo.task and cfg.data.source in prepare.GENERATED_SOURCES:  # the prompts' tasks, named by the key that set them, before the model loads
    prepare.check_task(cfg.grpo.task, "grpo.task")
  for task in cfg.grpo.curriculum:
    prepare.check_task(task, "grpo.curriculum")
  model = models.load_for(cfg.model)
  train, warmup, evals = load_prompts(cfg, model)
  if len(train) < g.prompts:
    raise UserError(f"only {len(train)} training prompts survived filtering; need >= grpo.prompts={g.prompts}")
  mesh = mesh_lib.make_mesh(cfg.mesh)
  if (g.micro_batch * g.group) % mesh.shape["fsdp"]:
    raise UserError(f"grpo.micro_batch * grpo.group = {g.micro_batch * g.group} rows must be a multiple of the "
                    f"fsdp mesh size {mesh.shape['fsdp']} ({jax.device_count()} devices)")
  dtype = jnp.dtype(cfg.model.dtype)
  params = runs.apply_init(init, model.params, model.cfg.new_tokens)
  params = models.place_params(params, model.cfg, mesh, dtype)
  model.params = None  # one copy of the weights: the policy and the reference both read `params`
  optimizer, step_fn, logp_fn, state_sh = jitted(model.cfg, cfg, mesh)
  cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(g, init=init))  # config.yaml names the resolved init
  return Trainer(cfg, out, model, schema, train, warmup, evals, params, mesh, optimizer, step_fn, logp_fn,
                 lora_lib.scale(cfg.lora), state_sh, init)


def jitted(model_cfg, cfg: Config, mesh):
  """(optimizer, update step, log-prob function, state shardings) for this config and mesh."""
  g, dtype, scale = cfg.grpo, jnp.dtype(cfg.model.dtype), lora_lib.scale(cfg.lora)
  optimizer = make_optimizer(g)
  state_sh = train_lib.state_sharding(model_cfg, cfg, optimizer, mesh)
  loss_fn = functools.partial(loss, cfg=model_cfg, g=g, lora_scale=scale, dtype=dtype, remat=cfg.model.remat,
                              chunk=cfg.model.vocab_chunk, on_policy=updates_per_step(g) == 1)
  accum = g.mini // g.micro_batch
  step_fn = jax.jit(functools.partial(train_lib.step, loss_fn=loss_fn, optimizer=optimizer, accum=accum),
                    donate_argnums=0, out_shardings=(state_sh, sharding_lib.replicated(mesh)))
  logp_fn = jax.jit(functools.partial(_logprobs, cfg=model_cfg, lora_scale=scale, dtype=dtype,
                                      chunk=cfg.model.vocab_chunk, temperature=g.sampling.temperature))
  return optimizer, step_fn, logp_fn, state_sh


def grpo_step(tr: Trainer, state, batch: Collated, step: int) -> tuple[Any, dict, dict]:
  """Rollout, reference / old log-probs, updates: the new state, every metric of the step, and the rollouts
  drawn (`Trainer.record`'s arguments)."""
  g = tr.cfg.grpo
  arrays, metrics, drawn = tr.sample(state.lora, batch, step)
  t0 = time.perf_counter()
  b, c = arrays.completion_tokens_BxC.shape
  arrays = dataclasses.replace(
    arrays, ref_logp_BxC=tr.score_logprobs(None, arrays) if g.beta else np.zeros((b, c), np.float32),
    old_logp_BxC=np.zeros((b, c), np.float32) if tr.on_policy else tr.score_logprobs(state.lora, arrays))
  metrics["time/reference"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, train_metrics = tr.update(state, arrays)
  metrics["time/train"] = time.perf_counter() - t0
  tokens = g.num_iterations * (arrays.prompt_mask_BxP.sum() + arrays.completion_mask_BxC.sum())
  metrics["tokens_per_s/train"] = float(tokens) / metrics["time/train"]
  return state, {**train_metrics, **metrics}, drawn


def run(cfg: Config) -> dict:
  """Train with GRPO, evaluate before/after, checkpoint; returns the summary (also summary.json)."""
  return loop.run(cfg, build, "grpo")


@cli
def main(argv: list[str] | None = None):
  cfg, _ = config.parse_args(Config, sys.argv[1:] if argv is None else argv)
  run(cfg)


if __name__ == "__main__":
  main()
