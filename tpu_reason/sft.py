"""`python -m tpu_reason.sft [--config recipes/X.yaml] [key=value ...]`: LoRA SFT on reasoning traces.

Fixed shapes (left-padded prompts, right-padded completion buckets), LoRA-only gradients,
a pure `_train_step(state, params, batch)` jitted once per bucket shape with donated state,
non-finite steps skipped, Orbax checkpoints with exact resume, held-out eval before/after.
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

from tpu_reason import (config_io, distributed, loop, lora as lora_lib, losses, mesh as mesh_lib, models, scoring,
                        sharding as sharding_lib, tags)
from tpu_reason import train as train_lib
from tpu_reason.train import TrainState, init_state, make_optimizer, schedule, state_sharding  # noqa: F401 (re-exported)
from tpu_reason.config import Config, TrainCfg
from tpu_reason.data import loader, packing
from tpu_reason.data.batch import Batch, Collated, PackedBatch, real_tokens
from tpu_reason.data.prepare import prepare
from tpu_reason.errors import UserError, cli
from tpu_reason.sampling import layout


def device_batch(batch: Collated) -> Batch | PackedBatch:
  """The array part of a collated or packed batch (lists of strings stay on the host)."""
  return jax.tree.map(np.asarray, batch.arrays)


def loss(lora, params, batch, *, cfg, lora_scale, dtype, remat, chunk):
  """Token-mean NLL of the completions (the SFT objective) and no aux."""
  logp = losses.sft_logprobs(params, cfg, batch, lora=lora, lora_scale=lora_scale, dtype=dtype, remat=remat,
                             chunk=chunk)
  return losses.sft_loss(logp, batch.completion_mask_BxC), {}


def _train_step(state: TrainState, params, batch, *, cfg, optimizer, lora_scale, dtype, remat, chunk, accum):
  """One SFT optimizer step over `accum` micro-batches; a non-finite loss/grad skips the update."""
  loss_fn = functools.partial(loss, cfg=cfg, lora_scale=lora_scale, dtype=dtype, remat=remat, chunk=chunk)
  return train_lib.step(state, params, batch, loss_fn=loss_fn, optimizer=optimizer, accum=accum)


def _eval_sums(lora, params, batch, *, cfg, lora_scale, dtype, chunk):
  logp = losses.completion_logprobs(params, cfg, batch, lora=lora, lora_scale=lora_scale, dtype=dtype, chunk=chunk)
  mask = batch.completion_mask_BxC
  return -jnp.sum(jnp.where(mask, logp, 0.0)), jnp.sum(mask)


# --------------------------------------------------------------------------- orchestration


@dataclasses.dataclass
class Trainer:
  """Holds what `run` builds once: model, data, mesh, jitted functions, sinks."""

  cfg: Config
  out: Path
  model: models.Model
  schema: tags.TagSchema
  train: list
  eval: list
  params: Any
  mesh: Any
  optimizer: optax.GradientTransformation
  step_fn: Any
  eval_fn: Any
  lora_scale: float
  state_sharding: Any
  kind = "sft"
  init = "base"
  lr_key = "train.optim.lr"
  samples_file = None
  plot = ([("train", "loss"), ("eval", "eval_loss"), ("train", "tokens_per_s"), ("eval", "format_accuracy")],
          "loss.png")

  @property
  def dtype(self):
    return jnp.dtype(self.cfg.model.dtype)

  def batches(self, start: int):
    t = self.cfg.train
    return loader.batches(self.train, t.batch_size, seed=t.seed, start_step=start)

  def step(self, state, batch: Collated, step: int):
    """One optimizer step: (state, metrics row, no record)."""
    t = self.cfg.train
    tokens = real_tokens(batch.arrays)
    t0 = time.perf_counter()
    state, m = self.step_fn(state, self.params, self.place_batch(batch))
    m = jax.device_get(m)
    dt = time.perf_counter() - t0
    lr = float(schedule(t.optim, t.max_steps)(step))
    row = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": lr,
           "tokens_per_s": tokens / dt, "step_time_s": dt, "skipped": int(not m["finite"])}
    if peak := mesh_lib.peak_flops(self.cfg.mesh):
      row["mfu"] = 6 * self.model.cfg.num_params * tokens / dt / (peak * jax.device_count())
    return state, row, None

  def held_out(self, lora, full: bool, before: bool = False) -> dict:
    """Held-out loss; `full` adds the scores of generated completions (before / after training, alike)."""
    if not self.eval:  # data.eval_size=0
      return {}
    return {"eval_loss": self.eval_loss(lora), **(self.generation_scores(lora) if full else {})}

  def completed(self, state) -> int:
    return int(state.step)

  def postfix(self, row: dict) -> dict:
    return {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.1e}", "tok_s": f"{row['tokens_per_s']:.0f}"}

  def table(self, before: dict, after: dict) -> str:
    return loop.table(before, after, ["eval_loss", "format_accuracy", "unclosed_rate", "answer_accuracy", "mean_completion_tokens"])

  def place_batch(self, batch: Collated) -> Batch | PackedBatch:
    return distributed.global_batch(device_batch(batch), self.mesh)

  def eval_loss(self, lora) -> float:
    total, count = 0.0, 0.0
    bs = self.cfg.train.batch_size
    for batch in loader.batches(self.eval, bs, shuffle=False, drop_remainder=False, num_epochs=1):
      s, n = self.eval_fn(lora, self.params, self.place_batch(batch))
      total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)

  def generation_scores(self, lora) -> dict:
    t = self.cfg.train
    rows = self.eval[: t.eval_generate]
    if not rows:
      return {}
    w, _ = layout.build(self.params, lora, self.model.cfg, self.mesh, lora_scale=self.lora_scale, dtype=self.dtype,
                        mode=self.cfg.mesh.decode_layout)
    with jax.set_mesh(self.mesh):  # each chip decodes its own rows
      scores, _ = scoring.generate_and_score(self.model, w.params, rows, self.schema, lora=w.lora,
                                              lora_scale=w.lora_scale, max_new_tokens=t.eval_max_new_tokens,
                                              dtype=self.dtype)
    return scores


def build(cfg: Config) -> Trainer:
  """Load model and data, build the mesh and the jitted step (no training yet)."""
  out = cfg.resolved_output_dir()
  schema = tags.get_schema(cfg.data.schema)
  model = models.load_for(cfg.model)
  train, evals, reports = prepare(cfg.data, model)
  for r in reports.values():
    print(r.summary())
  if cfg.data.pack:
    train = pack_rows(train, cfg.data, model)
  if len(train) < cfg.train.batch_size:
    raise UserError(f"only {len(train)} training rows survived filtering; need >= train.batch_size={cfg.train.batch_size}")
  mesh = mesh_lib.make_mesh(cfg.mesh)
  check_micro_batch(cfg.train, mesh.shape["fsdp"])
  dtype = jnp.dtype(cfg.model.dtype)
  params = models.place_params(model.params, model.cfg, mesh, dtype)
  model.params = None  # the host copy is no longer needed: keep one copy of the weights
  optimizer, step_fn, eval_fn, state_sh = jitted(model.cfg, cfg, mesh)
  return Trainer(cfg, out, model, schema, train, evals, params, mesh, optimizer, step_fn, eval_fn,
                 lora_lib.scale(cfg.lora), state_sh)


def pack_rows(examples: list, d, model) -> list:
  """The training examples packed into rows of max_prompt + max_completion tokens; prints the fill."""
  width = d.max_prompt_tokens + d.max_completion_tokens
  rows = packing.pack(examples, width, d.max_completion_tokens, model.pad_id, seed=d.seed)
  real = sum(int((r.segments_L > 0).sum()) for r in rows)
  padded = sum(ex.bucket + d.max_prompt_tokens for ex in examples)
  print(f"packed {len(examples)} examples into {len(rows)} rows of {width} tokens: {real / (len(rows) * width):.0%} "
        f"real tokens ({len(rows) * width} in all; {padded} unpacked in completion buckets)")
  return rows


def check_micro_batch(t: TrainCfg, fsdp: int):
  """The batch is split over the fsdp axis: each micro-batch must divide evenly."""
  micro = t.batch_size // t.grad_accum
  if micro % fsdp:
    raise UserError(f"micro-batch train.batch_size/grad_accum={micro} must be a multiple of the "
                    f"fsdp mesh size {fsdp}")


def jitted(model_cfg, cfg: Config, mesh):
  """(optimizer, update step, held-out loss sums, state shardings) for this config and mesh; `plan` compiles the
  step (the jitted `_train_step`)."""
  dtype, scale = jnp.dtype(cfg.model.dtype), lora_lib.scale(cfg.lora)
  optimizer = make_optimizer(cfg.train.optim, cfg.train.max_steps)
  state_sh = state_sharding(model_cfg, cfg, optimizer, mesh)
  step = functools.partial(_train_step, cfg=model_cfg, optimizer=optimizer, lora_scale=scale, dtype=dtype,
                           remat=cfg.model.remat, chunk=cfg.model.vocab_chunk, accum=cfg.train.grad_accum)
  # Pinning the output layout to the input layout keeps one compile per batch shape.
  step_fn = jax.jit(step, donate_argnums=0, out_shardings=(state_sh, sharding_lib.replicated(mesh)))
  eval_fn = jax.jit(functools.partial(_eval_sums, cfg=model_cfg, lora_scale=scale, dtype=dtype,
                                      chunk=cfg.model.vocab_chunk))
  return optimizer, step_fn, eval_fn, state_sh


def run(cfg: Config) -> dict:
  """Train, evaluate before/after, checkpoint; returns the summary (also saved as summary.json)."""
  return loop.run(cfg, build, "sft")


@cli
def main(argv: list[str] | None = None):
  cfg, _ = config_io.parse_args(Config, sys.argv[1:] if argv is None else argv)
  run(cfg)


if __name__ == "__main__":
  main()
