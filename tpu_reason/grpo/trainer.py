"""GRPO's trainer: the policy loss, the jitted update and log-prob functions, and `Trainer`, the steps the loop runs.

One step: sample G completions per prompt (`rollout`), the reference and old log-probs, then `num_iterations`
passes of clipped-surrogate + β·k3-KL updates over mini-batches. The policy is the init weights (base, or base
with the SFT adapter merged in) plus a fresh adapter; the reference is the same weights with the adapter off —
one copy.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tpu_reason import (distributed, lora as lora_lib, loop, losses, models, rewards, scoring, sharding as sharding_lib,
                        tags)
from tpu_reason import train as train_lib
from tpu_reason.config import Config, GrpoCfg
from tpu_reason.data import loader
from tpu_reason.data.batch import Batch, Collated, RolloutBatch, reward_columns
from tpu_reason.grpo import rollout
from tpu_reason.grpo.rollout import applicable
from tpu_reason.sampling import layout


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


def updates_per_step(g: GrpoCfg) -> int:
  return g.num_iterations * (g.prompts // g.mini)


def make_optimizer(g: GrpoCfg):
  """`grpo.optim` over `grpo.steps`, each step `updates_per_step` optimizer updates."""
  return train_lib.make_optimizer(g.optim, g.steps, updates_per_step(g))


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
  tasks: dict[str, list] = dataclasses.field(default_factory=dict)  # grpo.eval_tasks' held-out prompts, by task
  # "before" scores known without generating (`cli.init_before`: the SFT run's own), by task
  known_before: dict[str, dict] = dataclasses.field(default_factory=dict)
  stream: rollout.Stream | None = dataclasses.field(default=None, repr=False)  # set by `batches`
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
    """Rollout, reference / old log-probs, updates: (the new state, every metric of the step, its line of
    rollouts.jsonl)."""
    g = self.cfg.grpo
    arrays, metrics, drawn = self.sample(state.lora, batch, step)
    t0 = time.perf_counter()
    b, c = arrays.completion_tokens_BxC.shape
    arrays = dataclasses.replace(
      arrays, ref_logp_BxC=self.score_logprobs(None, arrays) if g.beta else np.zeros((b, c), np.float32),
      old_logp_BxC=np.zeros((b, c), np.float32) if self.on_policy else self.score_logprobs(state.lora, arrays))
    metrics["time/reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, train_metrics = self.update(state, arrays)
    metrics["time/train"] = time.perf_counter() - t0
    tokens = g.num_iterations * (arrays.prompt_mask_BxP.sum() + arrays.completion_mask_BxC.sum())
    metrics["tokens_per_s/train"] = float(tokens) / metrics["time/train"]
    m = {**train_metrics, **metrics}
    m["lr"] = float(train_lib.schedule(g.optim, g.steps, updates_per_step(g))(int(state.step) - 1))
    return state, m, self.record(**drawn)

  def record(self, ids: list, texts: list[str], kept: list[bool] | None = None) -> dict:
    """The step's line of rollouts.jsonl (with dynamic sampling every group drawn, and whether it was kept);
    `redact_thoughts` keeps only each reasoning's length."""
    if self.cfg.redact_thoughts:
      texts = [self.schema.redact(t) for t in texts]
    return {"ids": ids, "completions": texts, **({} if kept is None else {"kept": kept})}

  def held_out(self, lora, full: bool, before: bool = False) -> dict:
    """The task's held-out scores; `full` (before / after) adds each of grpo.eval_tasks' as "<task>/<metric>"
    (`before`: those of `known_before` as they are, not generated)."""
    known = self.known_before if before else {}
    scores = self.evaluate(lora, {name: prompts for name, prompts in self.tasks.items() if name not in known}
                           if full else {})
    return {**scores, **{f"{name}/{k}": v for name, metrics in known.items() for k, v in metrics.items()}}

  def completed(self, state) -> int | None:
    """Whole GRPO steps in `state` (None between the updates of one step: not exactly resumable)."""
    done, partial = divmod(int(state.step), updates_per_step(self.cfg.grpo))
    return None if partial else done

  def postfix(self, row: dict) -> dict:
    return {"reward": f"{row['reward']:.2f}", "kl": f"{row['kl']:.3f}", "len": f"{row['completions/mean_length']:.0f}"}

  def table(self, before: dict, after: dict) -> str:
    """The task's before / after table, then one per task of grpo.eval_tasks."""
    own = [k for k in after if not any(k.startswith(f"{task}/") for task in self.tasks)]
    per_task = [loop.table(task_scores(before, task), task_scores(after, task), TASK_METRICS, name=task)
                for task in self.tasks]
    return "\n\n".join([loop.table(before, after, own), *per_task])

  @property
  def on_policy(self) -> bool:
    """One update per rollout: the sampling policy is the one being updated (ratio 1)."""
    return updates_per_step(self.cfg.grpo) == 1

  def place(self, arrays):
    """Rows over the data axes; on several hosts each process hands jax only its own rows."""
    return distributed.global_batch(arrays, self.mesh)

  def batches(self, start: int) -> rollout.Stream:
    """The prompt stream from batch `start` on (the saved data_position): one batch a step, more with dynamic
    sampling, whose resample rounds draw from this same stream."""
    self.stream = rollout.Stream(self.prompt_batches(start), start)
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
      yield from rollout.take(self.unbudgeted_batches(start), g.max_completions // (g.prompts * g.group) - start)
    else:
      yield from self.unbudgeted_batches(start)

  def unbudgeted_batches(self, start: int):
    g, seed = self.cfg.grpo, self.cfg.train.seed
    if start < g.curriculum_steps:
      yield from rollout.take(loader.batches(self.warmup, g.prompts, seed=seed, start_step=start),
                              g.curriculum_steps - start)
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
    return r.arrays, {**rollout.rollout_metrics([r], self.cfg.grpo), **timing}, r.texts

  def dynamic_rollout(self, lora, batch: Collated, step: int) -> tuple[RolloutBatch, dict, dict]:
    """DAPO's dynamic sampling (`rollout.dynamic_rounds`): the kept groups of `batch` and of further batches of the
    stream, each round its own key, until grpo.prompts are kept or grpo.max_resample_rounds extra rounds are spent;
    a batch still short is filled with masked groups (`rollout.fill_batch`)."""
    g = self.cfg.grpo
    weights, timing = self.timed_weights(lora)  # once: every round samples the same policy
    rounds, keep, extra = rollout.dynamic_rounds(batch, self.stream,
                                                 lambda b, r: self.sample_round(weights, b, step, r), g)
    metrics = {**rollout.rollout_metrics(rounds, g), **timing, **rollout.dynamic_metrics(rounds, keep, extra, g)}
    return rollout.dynamic_batch(rounds, keep, g), metrics, rollout.dynamic_record(rounds, keep)

  def sample_round(self, weights: layout.Weights, batch: Collated, step: int, round: int = 0) -> rollout.Round:
    """Sample G completions per prompt (the key of `step` and `round`), score them, compute advantages."""
    return rollout.sample_round(weights, batch, step, round, model=self.model, schema=self.schema, g=self.cfg.grpo,
                                mesh=self.mesh, dtype=self.dtype)

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

  def evaluate(self, lora, tasks: dict[str, list] | None = None) -> dict:
    """Greedy completions on held-out prompts: accuracy, format, mean of each reward, length; and for each of
    `tasks` (name -> prompts) its TASK_METRICS as "<name>/<metric>"."""
    t, g = self.cfg.train, self.cfg.grpo
    rows = self.eval[: t.eval_generate]
    tasks = {name: prompts[: t.eval_generate] for name, prompts in (tasks or {}).items() if prompts}
    if not rows and not tasks:
      return {}
    w = self.decode_weights(lora)

    def generate(prompts):
      with jax.set_mesh(self.mesh):
        return scoring.generate_and_score(self.model, w.params, prompts, self.schema, lora=w.lora,
                                          lora_scale=w.lora_scale, max_new_tokens=t.eval_max_new_tokens,
                                          dtype=self.dtype)

    out = {}
    if rows:
      scores, texts = generate(rows)
      total, parts = rewards.score([r.prompt_text for r in rows], texts, dict(zip(g.rewards, g.reward_weights)),
                                   **reward_columns(rows), schema=self.schema.name)
      out = {"accuracy": scores["answer_accuracy"], "format_accuracy": scores["format_accuracy"],
             "reward": float(np.mean(total)),
             **{f"reward/{k}": float(np.mean(applicable(v))) for k, v in parts.items() if applicable(v)},
             "mean_completion_tokens": scores["mean_completion_tokens"], "rows": scores["rows"]}
    for name, prompts in tasks.items():
      scores, _ = generate(prompts)
      out.update({f"{name}/{k}": v for k, v in {**task_metrics(scores), "rows": scores["rows"]}.items()})
    return out


TASK_METRICS = ["accuracy", "format_accuracy", "unclosed_rate", "mean_completion_tokens"]


def task_metrics(scores: dict) -> dict:
  """The TASK_METRICS among scoring's scores (an SFT run's summary holds the same names): accuracy is its
  answer_accuracy."""
  named = {k: "answer_accuracy" if k == "accuracy" else k for k in TASK_METRICS}
  return {k: scores[name] for k, name in named.items() if name in scores}


def task_scores(scores: dict, task: str) -> dict:
  """One task's entries of a held-out dict ("<task>/<metric>"), under their metric names."""
  return {k.removeprefix(f"{task}/"): v for k, v in scores.items() if k.startswith(f"{task}/")}
