"""`python -m tpu_reason.plan --config recipes/X.yaml [--devices 8 | --tpu v5e-8] [--hbm-gib G]`: will it fit?

Per-device memory of the SFT step and of GRPO's two phases (rollouts, then the train step),
from abstract shapes only: no weights are loaded or allocated.

  base params, LoRA, Adam state  the sharding table applied to their shapes (`mesh.shard_shape`)
  LoRA gradients                 one adapter-sized tree (two when micro-batches accumulate)
  gathered layer                 FSDP all-gathers one layer's weights at a time
  activations                    what autodiff saves for the backward pass of the trainer's own
                                 loss (`sft.loss`, `grpo.loss`), traced with `jax.vjp` on
                                 the rows one device holds, plus one layer's worth of working memory
                                 while that layer is recomputed and differentiated (the reference
                                 and old-policy log-probs are forward-only)
  decode copy                    the merged weights the rollout decodes with (`sampling.layout`): base +
                                 LoRA in the compute dtype, whole over fsdp, split over tp; in its place,
                                 where it does not fit (or mesh.decode_layout=train), the gathered layer
  KV cache                       grpo.prompts prefixes + G samples each, rows split over fsdp like a
                                 batch (each chip decodes its own rows), kv heads over tp
  sampling logits                f32 logits of the device's rollout rows (vocabulary split over tp)

A setting a trainer would refuse on this mesh (a batch fsdp does not divide) is a mesh error: the table
still prints (its verdict is the memory's), then the command exits 2 with one `error:` line naming the
settings and the mesh size, and compiles nothing.

With `--devices N`, jax gets N fake CPU devices and the SFT train step is lowered and compiled
on the recipe's mesh twice: with a tiny stand-in of the model family at the recipe's batch and
sequence shapes (a quick shape and sharding check), and with the real model's abstract shapes,
whose XLA buffer assignment is a second opinion on the per-device total. CPU XLA keeps some
bf16 temporaries in f32, so that figure reads high.

With `--tpu v5e-8` (or v5e-1, v5e-4), libtpu's compiler builds, for compile-only chips of that
slice and the real model's shapes, the programs a run executes: the SFT step, GRPO's prefill and
decode loop, its log-prob pass and its update step. Its buffer assignment is each program's real
per-chip HBM; it refuses a program that does not fit (NO FIT). The exit status then follows the
compiler's verdicts (and settings a trainer would refuse), not the analytical table's. With
`--hbm-gib` below the chip's 15.75 GiB the compiler is held to that much; with `--stand-in` it
compiles the tiny stand-in instead of the real model (seconds, not minutes).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding

from tpu_reason import (config, grpo, hlo_cost, lora as lora_lib, mesh as mesh_lib, models, sft,
                        sharding as sharding_lib, train as train_lib)
from tpu_reason.config import Config
from tpu_reason.data.batch import Batch, PackedBatch, RolloutBatch
from tpu_reason.errors import UserError, cli
from tpu_reason.models.transformer import KVCache, ModelConfig, init_cache, param_dtypes, param_shapes
from tpu_reason.tree import flatten, unflatten
from tpu_reason.sampling import layout, sampler

GIB = 2**30
FLAGS = {"--devices": "devices", "--hbm-gib": "hbm_gib", "--tpu": "tpu", "--stand-in": "stand_in?"}
V5E_HBM_GIB = 15.75  # of a v5e chip's 16 GiB, what libtpu's compiler lets programs use (it reserves the rest)
# --tpu name -> (libtpu topology, chips per host): compile-only chips of one v5e host
TPUS = {"v5e-1": ("v5e:1x1", (1, 1, 1)), "v5e-4": ("v5e:2x2", (2, 2, 1)), "v5e-8": ("v5e:2x4", (2, 2, 1))}
# The compiled steps never run: skip LLVM's optimisations (the HLO passes and buffer assignment still run).
QUICK = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase's per-device bytes by item, and the shapes behind them."""

  name: str
  items: dict[str, int]
  shapes: str

  @property
  def total(self) -> int:
    return sum(self.items.values())


@dataclasses.dataclass(frozen=True)
class Plan:
  """A recipe's memory plan: phases side by side against one device's HBM."""

  title: str
  phases: tuple[Phase, ...]
  hbm: int
  notes: tuple[str, ...] = ()
  errors: tuple[str, ...] = ()  # settings a trainer would refuse on this mesh
  decode_layout: str = "merged"  # what the rollout decodes with (`sampling.layout`): merged | train

  @property
  def fits(self) -> bool:
    return not self.errors and all(p.total <= self.hbm for p in self.phases)

  @property
  def peak(self) -> Phase:
    return max(self.phases, key=lambda p: p.total)


# --------------------------------------------------------------------------- shapes


def nbytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
  # in bits: int4 weights take half a byte on the TPU (packed), not numpy's whole byte
  return sum(math.prod(x.shape) * jax.dtypes.itemsize_bits(x.dtype) for x in jax.tree.leaves(tree)) // 8


def _dtype(dtype, name: str):
  return dtype[name] if isinstance(dtype, dict) else dtype


def local_tree(table: dict, dtype, mesh) -> dict:
  """ShapeDtypeStructs of the block of every table entry that one device holds (`dtype`: one, or by name)."""
  return unflatten({k: jax.ShapeDtypeStruct(sharding_lib.shard_shape(s, a, mesh), _dtype(dtype, k))
                    for k, (s, a) in table.items()})


def full_tree(table: dict, dtype, mesh=None) -> dict:
  """ShapeDtypeStructs of whole table entries (laid out over `mesh` when given; `dtype`: one, or by name)."""
  shard = flatten(sharding_lib.shardings(table, mesh)) if mesh is not None else {}
  return unflatten({k: jax.ShapeDtypeStruct(s, _dtype(dtype, k), sharding=shard.get(k)) for k, (s, _) in table.items()})


def base_params(model_cfg: ModelConfig, dtype, mesh=None) -> dict:
  """The base weights as the trainers place them (quantised projections in their own format)."""
  return full_tree(param_shapes(model_cfg), param_dtypes(model_cfg, dtype), mesh)


def rows_per_device(rows: int, mesh) -> int:
  """Rows of a batch one device holds (all of them when fsdp does not divide the batch)."""
  return sharding_lib.shard_shape((rows,), ("batch",), mesh)[0]


def per_device_model(model_cfg: ModelConfig, mesh) -> ModelConfig:
  """The architecture one device computes: heads, kv heads and mlp split over tp as the table splits them."""
  split = lambda n, axis: sharding_lib.shard_shape((n,), (axis,), mesh)[0]  # noqa: E731
  return dataclasses.replace(model_cfg, num_heads=split(model_cfg.num_heads, "heads"),
                             num_kv_heads=split(model_cfg.num_kv_heads, "kv_heads"),
                             hidden_dim=split(model_cfg.hidden_dim, "mlp"))


# The abstract batches are the trainers' own types (`data.batch`) holding ShapeDtypeStructs.
abstract_batch = Batch.spec  # an SFT (or GRPO log-prob) batch: prompt + completion tokens and masks
packed_batch = PackedBatch.spec  # a packed SFT batch (`data.pack`): rows of prompt + completion tokens
grpo_batch = RolloutBatch.spec  # a GRPO update's micro-batch: rollout tokens plus advantages and stored log-probs


def sft_batch(cfg: Config):
  """`abstract_batch` or `packed_batch`, as the recipe's SFT step sees it."""
  return packed_batch if cfg.data.pack else abstract_batch


# --------------------------------------------------------------------------- activations


def residual_bytes(fn, primal, *rest) -> int:
  """Bytes autodiff keeps for the backward of `fn` w.r.t. `primal` (new buffers, not inputs)."""
  closed = jax.make_jaxpr(lambda x, *r: jax.vjp(lambda y: fn(y, *r), x)[1])(primal, *rest)
  inputs = set(closed.jaxpr.invars)
  saved = [v for v in closed.jaxpr.outvars if isinstance(v, jax.extend.core.Var) and v not in inputs]
  return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in saved)


def sft_loss(model_cfg: ModelConfig, cfg: Config):
  """SFT's loss(lora, params, batch, remat=...) for these shapes."""
  return functools.partial(sft.loss, cfg=model_cfg, lora_scale=lora_lib.scale(cfg.lora),
                           dtype=jnp.dtype(cfg.model.dtype), chunk=cfg.model.vocab_chunk)


def grpo_loss(model_cfg: ModelConfig, cfg: Config):
  """GRPO's policy loss(lora, params, micro_batch, remat=...) for these shapes."""
  return functools.partial(grpo.loss, cfg=model_cfg, g=cfg.grpo, lora_scale=lora_lib.scale(cfg.lora),
                           dtype=jnp.dtype(cfg.model.dtype), chunk=cfg.model.vocab_chunk,
                           on_policy=grpo.updates_per_step(cfg.grpo) == 1)


def activation_bytes(loss, model_cfg: ModelConfig, cfg: Config, batch: dict) -> int:
  """Backward-pass memory of `loss` on `batch`: saved residuals + one layer being differentiated."""
  dtype = jnp.dtype(cfg.model.dtype)
  params = base_params(model_cfg, dtype)
  lora = full_tree(lora_lib.shapes(model_cfg, cfg.lora), jnp.float32)  # the trainers' f32 master adapters
  kept = {remat: residual_bytes(functools.partial(loss, remat=remat), lora, params, batch)
          for remat in {"none", "full", cfg.model.remat}}
  one_layer = (kept["none"] - kept["full"]) // model_cfg.num_layers
  return kept[cfg.model.remat] + one_layer


def kv_cache_bytes(model_cfg: ModelConfig, rows: int, slots: int, dtype) -> int:
  """Bytes of the sampler's KV cache for `rows` sequences of `slots` tokens."""
  return nbytes(jax.eval_shape(functools.partial(init_cache, model_cfg, rows, slots, dtype)))


# --------------------------------------------------------------------------- the plan


def plan(cfg: Config, model_cfg: ModelConfig, n_devices: int, hbm_bytes: int) -> Plan:
  """Per-device memory of SFT and GRPO for `cfg` on `n_devices`, from shapes alone."""
  mesh = mesh_lib.abstract_mesh(cfg.mesh, n_devices)
  dtype = jnp.dtype(cfg.model.dtype)
  t, d, g = cfg.train, cfg.data, cfg.grpo
  fsdp = mesh.shape["fsdp"]
  errors, notes = [], []
  try:
    sft.check_micro_batch(t, fsdp)
  except UserError as e:
    errors.append(f"SFT: {e}")
  if (g.micro_batch * g.group) % fsdp:  # grpo.build's check
    errors.append(f"GRPO: grpo.micro_batch * grpo.group = {g.micro_batch * g.group} rows must be a multiple of "
                  f"the fsdp mesh size {fsdp}")
  local = per_device_model(model_cfg, mesh)
  # the adapters and their Adam moments stay float32 whatever the model dtype (master weights)
  lora_local = local_tree(lora_lib.shapes(model_cfg, cfg.lora), jnp.float32, mesh)
  resident = {
      "base params": nbytes(local_tree(param_shapes(model_cfg), param_dtypes(model_cfg, dtype), mesh)),
      "LoRA adapters": nbytes(lora_local),
      "optimizer state": nbytes(jax.eval_shape(train_lib.make_optimizer(t.optim, t.max_steps).init, lora_local)),
  }
  unsplit = mesh_lib.abstract_mesh(config.MeshCfg(fsdp=1, tp=mesh.shape["tp"]), mesh.shape["tp"])

  def one_layer(c: ModelConfig, dtypes) -> int:  # the whole of one layer over fsdp (tp still splits it)
    layers = {k: v for k, v in param_shapes(c).items() if k.startswith("layers/")}
    return nbytes(local_tree(layers, dtypes, unsplit)) // c.num_layers

  gathered = {}
  if fsdp > 1:  # all-gathered for its matmuls
    gathered["gathered layer (FSDP)"] = one_layer(model_cfg, param_dtypes(model_cfg, dtype))
  if model_cfg.quant != "none":  # the layer the scan computes with, widened back to the compute dtype
    gathered["dequantized layer"] = one_layer(dataclasses.replace(model_cfg, quant="none"), dtype)

  def train_phase(name: str, loss, batch_of, rows: int, completion: int, accumulating: bool) -> Phase:
    per_dev = rows_per_device(rows, mesh)
    grads = nbytes(lora_local) * (2 if accumulating else 1)
    act = activation_bytes(loss, local, cfg, batch_of(per_dev, d.max_prompt_tokens, completion))
    items = {**resident, "LoRA gradients": grads, **gathered, "activations": act}
    remat = "no remat" if cfg.model.remat == "none" else f"remat {cfg.model.remat}"
    return Phase(name, items, f"{per_dev} rows/device x ({d.max_prompt_tokens}+{completion}) tokens, {remat}")

  # the largest completion bucket is always max_completion_tokens (data.examples.completion_buckets)
  sft_phase = train_phase("SFT step", sft_loss(local, cfg), sft_batch(cfg), t.batch_size // t.grad_accum,
                          d.max_completion_tokens, t.grad_accum > 1)
  prompts, rows = rows_per_device(g.prompts, mesh), rows_per_device(g.prompts * g.group, mesh)
  new = g.sampling.max_new_tokens
  kv = kv_cache_bytes(local, prompts, d.max_prompt_tokens, dtype) + kv_cache_bytes(local, rows, new, dtype)
  vocab = sharding_lib.shard_shape((model_cfg.vocab_size,), ("vocab",), mesh)[0]
  sampling = {"KV cache": kv, "sampling logits": rows * vocab * 4}
  copy = {"decode copy (merged)": layout.bytes_per_device(model_cfg, mesh, dtype)}
  # auto: merged when the copy fits beside the training state (what the trainer decides at run time)
  merged = sum({**resident, **copy, **sampling}.values()) <= hbm_bytes
  decode = cfg.mesh.decode_layout if cfg.mesh.decode_layout != "auto" else ("merged" if merged else "train")
  if cfg.mesh.decode_layout == "auto" and not merged:
    notes.append(f"GRPO rollout: the merged decode copy ({copy['decode copy (merged)'] / GIB:.2f} GiB) does not fit "
                 "beside the training state: decoding on the training layout (weights all-gathered per token)")
  rollout = Phase("GRPO rollout", {**resident, **(copy if decode == "merged" else gathered), **sampling},
                  f"{prompts} prompts x G={g.group} = {rows} rows/device, {d.max_prompt_tokens}+{new} tokens, "
                  f"{decode} decode layout")
  if prompts == g.prompts and fsdp > 1:
    notes.append(f"GRPO rollout: grpo.prompts={g.prompts} is not a multiple of fsdp={fsdp}, so every chip holds "
                 "every prompt's cache")
  grpo_train = train_phase("GRPO train", grpo_loss(local, cfg), grpo_batch, g.micro_batch * g.group,
                           g.sampling.max_new_tokens, g.mini > g.micro_batch)

  lora_n = sum(math.prod(s) for s, _ in lora_lib.shapes(model_cfg, cfg.lora).values())
  title = (f"{cfg.name}: {cfg.model.spec} ({model_cfg.family}, {model_cfg.num_params / 1e9:.2f}B params, "
           f"{cfg.model.dtype}), LoRA r{cfg.lora.rank} on {cfg.lora.targets} ({lora_n / 1e6:.1f}M), "
           f"mesh fsdp={mesh.shape['fsdp']} x tp={mesh.shape['tp']}")
  return Plan(title, (sft_phase, rollout, grpo_train), hbm_bytes, tuple(notes), tuple(errors), decode)


def table(p: Plan) -> str:
  """The plan as a text table in GiB, one column per phase."""
  names = list(dict.fromkeys(k for ph in p.phases for k in ph.items))
  head = f"{'per device (GiB)':<24}" + "".join(f"{ph.name:>14}" for ph in p.phases)
  cell = lambda ph, k: f"{ph.items[k] / GIB:>14.3f}" if k in ph.items else f"{'-':>14}"  # noqa: E731
  lines = [p.title, head, "-" * len(head)]
  lines += [f"{k:<24}" + "".join(cell(ph, k) for ph in p.phases) for k in names]
  lines.append("-" * len(head))
  lines.append(f"{'total':<24}" + "".join(f"{ph.total / GIB:>14.3f}" for ph in p.phases))
  lines.append(f"{'% of HBM':<24}" + "".join(f"{100 * ph.total / p.hbm:>13.1f}%" for ph in p.phases))
  lines.append(f"{'fits':<24}" + "".join(f"{'FIT' if ph.total <= p.hbm else 'NO FIT':>14}" for ph in p.phases))
  lines += [f"  {ph.name}: {ph.shapes}" for ph in p.phases]
  lines += [f"  note: {n}" for n in p.notes]
  lines += [f"  error: {e}" for e in p.errors]
  verdict = "FIT" if all(ph.total <= p.hbm for ph in p.phases) else "NO FIT"
  refused = " (memory only: the trainers refuse this mesh, see the errors above)" if p.errors else ""
  lines.append(f"{verdict}: peak {p.peak.total / GIB:.2f} GiB ({p.peak.name}) of {p.hbm / GIB:.2f} GiB HBM per device"
               + refused)
  return "\n".join(lines)


def check_mesh(p: Plan, n_devices: int):
  """The settings a trainer would refuse on this mesh, as one line (the memory table is no answer to them)."""
  if p.errors:
    raise UserError(f"mesh error on {n_devices} device(s): " + "; ".join(e.replace(": ", " ", 1) for e in p.errors))


# --------------------------------------------------------------------------- compile checks


def stand_in(model_cfg: ModelConfig) -> ModelConfig:
  """A tiny model of the same family and vocabulary: compiles in seconds, same code paths."""
  window = model_cfg.sliding_window
  return dataclasses.replace(
      model_cfg, embed_dim=64, hidden_dim=128, num_layers=2, num_heads=4,
      num_kv_heads=1 if model_cfg.num_kv_heads == 1 else 2, head_dim=16,
      sliding_window=None if window is None else min(window, 8), global_every=min(model_cfg.global_every, 2))


def laid_out(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves with the matching leaves of `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def rows_over_fsdp(tree, mesh):
  """ShapeDtypeStructs of `tree`: every leaf's rows over fsdp, as the trainers place batches; scalars replicated."""
  def one(x):
    sharding = sharding_lib.rows_sharding(mesh, x.shape)  # replicated where fsdp does not divide the rows
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(one, tree)


def abstract_state(model_cfg: ModelConfig, cfg: Config, optimizer, state_sh) -> train_lib.TrainState:
  """The trainers' TrainState (float32 adapters and Adam moments) laid out as `state_sh`."""
  lora = train_lib.abstract_lora(lora_lib.shapes(model_cfg, cfg.lora))
  state = jax.eval_shape(functools.partial(train_lib.init_state, optimizer=optimizer, seed=cfg.train.seed), lora)
  return laid_out(state, state_sh)


def lower_sft_step(cfg: Config, model_cfg: ModelConfig, mesh) -> jax.stages.Lowered:
  """`sft`'s jitted train step lowered on `mesh` for the recipe's batch shapes (abstract inputs)."""
  optimizer, step, _, state_sh = sft.jitted(model_cfg, cfg, mesh)
  state = abstract_state(model_cfg, cfg, optimizer, state_sh)
  params = base_params(model_cfg, jnp.dtype(cfg.model.dtype), mesh)
  batch = sft_batch(cfg)(cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_completion_tokens,
                         sharding_lib.rows_sharding(mesh, (cfg.train.batch_size, 1)))
  # the forward's sharding constraints read the context mesh; eager work (above) must stay outside it
  with jax.set_mesh(mesh):
    return step.lower(state, params, batch)


def xla_bytes(compiled) -> dict[str, int]:
  """Per-device bytes from XLA's buffer assignment of a compiled step."""
  m = compiled.memory_analysis()
  args, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                            m.temp_size_in_bytes)
  return {"arguments": args, "outputs (not donated)": out - alias, "temporaries": temp,
          "total": args + out - alias + temp}


def compile_checks(cfg: Config, model_cfg: ModelConfig, hbm_bytes: int) -> list[str]:
  """Compile the SFT step on this process's devices: tiny stand-in, then the real shapes."""
  mesh = mesh_lib.make_mesh(cfg.mesh)
  shapes = f"batch {cfg.train.batch_size} x ({cfg.data.max_prompt_tokens}+{cfg.data.max_completion_tokens}) tokens"
  lines = []
  t0 = time.perf_counter()
  lower_sft_step(cfg, stand_in(model_cfg), mesh).compile(QUICK)
  lines.append(f"compile check: SFT train step on {mesh.devices.size} CPU devices, tiny {model_cfg.family} "
               f"stand-in, {shapes}: OK ({time.perf_counter() - t0:.1f} s)")
  t0 = time.perf_counter()
  xla = xla_bytes(lower_sft_step(cfg, model_cfg, mesh).compile(QUICK))
  parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in xla.items() if k != "total")
  verdict = "FIT" if xla["total"] <= hbm_bytes else "NO FIT"
  lines.append(f"XLA (CPU) buffers of the real SFT step per device: {parts} = {xla['total'] / GIB:.3f} GiB "
               f"{verdict} ({time.perf_counter() - t0:.1f} s)")
  return lines


# --------------------------------------------------------------------------- GRPO programs


def cache_layout(cache: KVCache, mesh) -> KVCache:
  """A KV cache's leaves laid out by the table: rows over fsdp, kv heads over tp."""
  def one(x, axes):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, sharding_lib.spec(x.shape, axes, mesh)))

  return dataclasses.replace(cache, k=one(cache.k, ("layers", "batch", "kv_heads", "head_dim", "seq")),
                             v=one(cache.v, ("layers", "batch", "kv_heads", "seq", "head_dim")),
                             valid=one(cache.valid, ("batch", "seq")), pos=one(cache.pos, ("batch", "seq")))


def decode_weights(cfg: Config, model_cfg: ModelConfig, mesh, decode: str):
  """(params, lora, lora_scale) as the sampler reads them in the `decode` layout, abstract; and the merge that
  builds the merged copy from the training layout, lowered (None on the training layout)."""
  dtype, scale = jnp.dtype(cfg.model.dtype), lora_lib.scale(cfg.lora)
  params = base_params(model_cfg, dtype, mesh)
  table = lora_lib.shapes(model_cfg, cfg.lora)
  lora = laid_out(train_lib.abstract_lora(table), sharding_lib.shardings(table, mesh))  # TrainState.lora's layout
  if decode == "train":
    return (params, lora, scale), None
  merge = layout.merge_fn(model_cfg, mesh, float(scale), dtype)
  merged = laid_out(jax.eval_shape(merge, params, lora), layout.shardings(model_cfg, mesh))
  return (merged, None, 1.0), merge.lower(params, lora)


def lower_rollout(cfg: Config, model_cfg: ModelConfig, mesh, decode: str = "merged") -> dict[str, jax.stages.Lowered]:
  """The merge into the decode copy (once per rollout), the sampler's prefill of `grpo.prompts` prompts and its
  decode loop over G samples of each, lowered."""
  g, dtype = cfg.grpo, jnp.dtype(cfg.model.dtype)
  (params, lora, scale), merge = decode_weights(cfg, model_cfg, mesh, decode)
  prompt = abstract_batch(g.prompts, cfg.data.max_prompt_tokens, 0, sharding_lib.rows_sharding(mesh, (g.prompts, 1)))
  tokens, mask = prompt.prompt_tokens_BxP, prompt.prompt_mask_BxP
  cache, first, next_pos = jax.eval_shape(functools.partial(sampler.prefill, cfg=model_cfg, dtype=dtype),
                                          params, lora, scale, tokens, mask)
  prefix = cache_layout(dataclasses.replace(cache, group=g.group), mesh)
  mode = sampler.sampling_mode(g.sampling)
  eos = jax.ShapeDtypeStruct((1,), jnp.int32)
  start = functools.partial(sampler.start, cfg=model_cfg, group=g.group, max_new=g.sampling.max_new_tokens, mode=mode,
                            slots=g.sampling.max_new_tokens, dtype=dtype)
  pad = jax.ShapeDtypeStruct((), jnp.int32)
  state = jax.eval_shape(start, prefix, first, next_pos, jax.eval_shape(jax.random.key, 0), eos_ids=eos, pad_id=pad)
  # span = all slots: the last and largest of the decode calls `sampler.generate` makes
  state = dataclasses.replace(rows_over_fsdp(dataclasses.replace(state, suffix=None), mesh),
                              suffix=cache_layout(state.suffix, mesh))
  with jax.set_mesh(mesh):
    programs = {
        "GRPO prefill": sampler.prefill.lower(params, lora, scale, tokens, mask, cfg=model_cfg, dtype=dtype),
        "GRPO decode": sampler.decode.lower(params, lora, scale, prefix, state, g.sampling.max_new_tokens, eos, pad,
                                            cfg=model_cfg, mode=mode, span=g.sampling.max_new_tokens, dtype=dtype)}
  return programs if merge is None else {"GRPO merge": merge, **programs}


def lower_grpo_train(cfg: Config, model_cfg: ModelConfig, mesh) -> dict[str, jax.stages.Lowered]:
  """GRPO's log-prob pass on one micro-batch (with the adapters) and its update on one mini-batch, lowered."""
  g, p, c = cfg.grpo, cfg.data.max_prompt_tokens, cfg.grpo.sampling.max_new_tokens
  optimizer, step_fn, logp_fn, state_sh = grpo.jitted(model_cfg, cfg, mesh)
  state = abstract_state(model_cfg, cfg, optimizer, state_sh)
  params = base_params(model_cfg, jnp.dtype(cfg.model.dtype), mesh)
  micro = rows_over_fsdp(abstract_batch(g.micro_batch * g.group, p, c), mesh)
  mini = rows_over_fsdp(grpo_batch(g.mini * g.group, p, c), mesh)
  with jax.set_mesh(mesh):
    return {"GRPO log-probs": logp_fn.lower(state.lora, params, micro),
            "GRPO update": step_fn.lower(state, params, mini)}


def lower_all(cfg: Config, model_cfg: ModelConfig, mesh, decode: str = "merged") -> dict[str, jax.stages.Lowered]:
  """Every program a run compiles at its largest shapes, by name (the rollout's in the `decode` layout)."""
  return {"SFT step": lower_sft_step(cfg, model_cfg, mesh), **lower_rollout(cfg, model_cfg, mesh, decode),
          **lower_grpo_train(cfg, model_cfg, mesh)}


# --------------------------------------------------------------------------- the TPU compiler

DECODE_LOOP = hlo_cost.DECODE_LOOP  # its trip count is data dependent: a run's max_new_tokens at most
# each program beside the analytical phase that covers it (the log-prob pass has none)
PLAN_PHASE = {"SFT step": "SFT step", "GRPO merge": "GRPO rollout", "GRPO prefill": "GRPO rollout",
              "GRPO decode": "GRPO rollout", "GRPO update": "GRPO train"}


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One program as libtpu's compiler built it for one chip, or its reason for refusing."""

  name: str
  sizes: dict[str, int]  # `xla_bytes`; empty when refused
  all_gathers: int
  seconds: float
  refused: str = ""  # the compiler's one-line reason
  log: str = ""  # where libtpu wrote its buffer list, when refused
  cost: hlo_cost.Cost | None = None  # per chip, every loop at its trip count (`hlo_cost`)
  token: hlo_cost.Cost | None = None  # one iteration of the decode loop: one generated token (decode only)
  xla_flops: float = 0.0  # the compiler's own cost analysis: loop bodies counted once, for comparison

  def fits(self, hbm: int) -> bool:
    return not self.refused and self.sizes["total"] <= hbm


def tpu_devices(name: str) -> list:
  """Compile-only chips of a TPU slice: libtpu's compiler runs on this host, nothing executes."""
  if name not in TPUS:
    raise UserError(f"--tpu must be one of {', '.join(TPUS)}, got {name!r}")
  if importlib.util.find_spec("libtpu") is None:
    raise UserError('--tpu needs the TPU compiler (libtpu): pip install "tpu_reason[tpu]"')
  topology, host = TPUS[name]
  try:
    return topologies.get_topology_desc(topology, "tpu", chips_per_host_bounds=list(host)).devices
  except jax.errors.JaxRuntimeError as e:
    if "lockfile" not in str(e):
      raise
    # libtpu admits one process a host, and any jax process (a CPU run too) takes it when libtpu is installed
    raise UserError("--tpu: another process holds libtpu (/tmp/libtpu_lockfile; any running jax program "
                    "takes it): wait for it to end, or run with ALLOW_MULTIPLE_LIBTPU_LOAD=1") from None


def all_gathers(hlo: str) -> int:
  """All-gather ops (synchronous, or the start of an async one) in compiled HLO text."""
  return len(re.findall(r"\ball-gather(?:-start)?\(", hlo))


def refusal(message: str) -> str:
  """The compiler's one-line reason from its out-of-memory error, without the status codes."""
  line = message.strip().splitlines()[0]
  return line[line.index("Ran out of memory"):] if "Ran out of memory" in line else line


def tpu_log() -> str:
  """The file libtpu logs this process's errors to (its buffer list among them), else its folder."""
  folder = os.environ.get("TPU_LOG_DIR", "/tmp/tpu_logs")
  logs = sorted(glob.glob(os.path.join(folder, f"*.ERROR.*.{os.getpid()}")), key=os.path.getmtime)
  return logs[-1] if logs else folder


def compile_tpu(name: str, lowered: jax.stages.Lowered, options: dict, trips: dict[str, int] | None = None
                ) -> Compiled:
  """Compile one program for TPU: its per-chip bytes, all-gathers and loop-weighted costs (`trips`: loop
  op_name -> count for loops the HLO cannot count), or the compiler's refusal."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    if not str(e).startswith("RESOURCE_EXHAUSTED"):
      raise
    return Compiled(name, {}, 0, time.perf_counter() - t0, refusal(str(e)), tpu_log())
  text = compiled.as_text()
  module = hlo_cost.parse(text)
  token = hlo_cost.iteration_cost(module, DECODE_LOOP) if hlo_cost.loops(module, DECODE_LOOP) else None
  xla = compiled.cost_analysis() or {}
  return Compiled(name, xla_bytes(compiled), all_gathers(text), time.perf_counter() - t0,
                  cost=hlo_cost.program_cost(module, trips), token=token, xla_flops=float(xla.get("flops", 0.0)))


TPU_HEAD = (f"{'per chip (GiB)':<16}{'arguments':>11}{'outputs':>9}{'temporaries':>13}{'total':>9}{'plan':>9}"
            f"{'all-gathers':>13}  verdict")


def tpu_row(c: Compiled, p: Plan) -> str:
  """One program's line: the compiler's figures beside the plan's total for its phase."""
  if c.refused:
    return f"{c.name:<16}  NO FIT: {c.refused} ({c.seconds:.0f} s)\n{'':<16}  libtpu's buffer list: {c.log}"
  b = {k: v / GIB for k, v in c.sizes.items()}
  phase = {ph.name: ph.total / GIB for ph in p.phases}.get(PLAN_PHASE.get(c.name))
  planned = f"{phase:>9.3f}" if phase is not None else f"{'-':>9}"
  return (f"{c.name:<16}{b['arguments']:>11.3f}{b['outputs (not donated)']:>9.3f}{b['temporaries']:>13.3f}"
          f"{b['total']:>9.3f}{planned}{c.all_gathers:>13}  {'FIT' if c.fits(p.hbm) else 'NO FIT'} "
          f"({c.seconds:.0f} s)")


def tpu_notes(cfg: Config, model_cfg: ModelConfig, mesh) -> list[str]:
  """What the compiled programs' shapes are, and what the per-program figures leave out."""
  g, d, t = cfg.grpo, cfg.data, cfg.train
  lora_local = local_tree(lora_lib.shapes(model_cfg, cfg.lora), jnp.float32, mesh)
  adam = nbytes(jax.eval_shape(train_lib.make_optimizer(t.optim, t.max_steps).init, lora_local))
  return [
      f"  SFT step: batch {t.batch_size} (micro-batches of {t.batch_size // t.grad_accum}) x "
      f"({d.max_prompt_tokens}+{d.max_completion_tokens}) tokens",
      f"  GRPO prefill / decode: {g.prompts} prompts of {d.max_prompt_tokens} tokens, then {g.prompts * g.group} "
      f"rows (G={g.group}) of {g.sampling.max_new_tokens} new tokens, rows over fsdp",
      f"  GRPO log-probs: {g.micro_batch * g.group} rows x ({d.max_prompt_tokens}+{g.sampling.max_new_tokens}), "
      "with the "
      "adapters (the old-policy pass; the reference pass is the same without them); no analytical column",
      f"  GRPO update: {g.mini * g.group} rows (micro-batches of {g.micro_batch * g.group}) x "
      f"({d.max_prompt_tokens}+{g.sampling.max_new_tokens}) tokens",
      "  outputs: those not donated to an argument's buffer; plan: the analytical total above for the phase",
      f"  note: prefill, decode and log-probs run while the trainer also holds the Adam moments "
      f"({adam / GIB:.3f} GiB per chip), which are not among those programs' arguments",
  ]


def tpu_verdict(tpu: str, results: list[Compiled], p: Plan) -> tuple[bool, str]:
  """(whether every program fits and the trainers accept the settings, the closing line)."""
  failed = [c.name for c in results if not c.fits(p.hbm)] + list(p.errors)
  built = [c for c in results if not c.refused]
  worst = max(built, key=lambda c: c.sizes["total"]) if built else None
  peak = f", peak {worst.sizes['total'] / GIB:.2f} GiB ({worst.name})" if worst else ""
  verdict = "NO FIT: " + "; ".join(failed) if failed else "FIT"
  return not failed, f"TPU {tpu}: {verdict}{peak} of {p.hbm / GIB:g} GiB per chip"


# --------------------------------------------------------------------------- time on paper

TIME_HEAD = (f"{'per chip':<16}{'GFLOP':>9}{'XLA GFLOP':>11}{'HBM GB':>9}{'coll. MB':>10}{'compute ms':>12}"
             f"{'HBM ms':>9}{'ICI ms':>9}{'roofline ms':>13}")


def ms(seconds: float) -> str:
  return f"{seconds * 1e3:,.2f} ms"


def time_row(c: Compiled) -> str:
  """One program's loop-weighted counts per chip and its roofline time on a v5e chip."""
  if c.cost is None:
    return f"{c.name:<16}  - (refused)"
  r, coll = hlo_cost.roofline(c.cost), sum(c.cost.collective_bytes().values())
  return (f"{c.name:<16}{c.cost.flops / 1e9:>9.2f}{c.xla_flops / 1e9:>11.2f}{c.cost.hbm_bytes / 1e9:>9.2f}"
          f"{coll / 1e6:>10.1f}{r.compute_s * 1e3:>12.2f}{r.hbm_s * 1e3:>9.2f}{r.ici_s * 1e3:>9.2f}"
          f"{r.seconds * 1e3:>13.2f}")


def decode_floor(cfg: Config, model_cfg: ModelConfig, mesh, p: Plan) -> tuple[int, int]:
  """(weights, KV cache) bytes a chip must read per generated token: its tp share of the weights whole over
  fsdp (each chip decodes its own rows) and its rows' KV cache (the plan's), each once."""
  tp = mesh.shape["tp"]
  unsplit = mesh_lib.abstract_mesh(config.MeshCfg(fsdp=1, tp=tp), tp)
  weights = nbytes(local_tree(param_shapes(model_cfg), param_dtypes(model_cfg, jnp.dtype(cfg.model.dtype)), unsplit))
  return weights, next(ph.items["KV cache"] for ph in p.phases if ph.name == "GRPO rollout")


def decode_lines(token: hlo_cost.Cost, weights: int, kv: int) -> list[str]:
  """Per generated token per chip: what the collectives move, the roofline, and how far it is off the HBM floor."""
  moved = sorted(token.collective_bytes().items(), key=lambda kv: -kv[1])
  r, floor = hlo_cost.roofline(token), (weights + kv) / hlo_cost.V5E.hbm
  return [f"GRPO decode, per generated token per chip: collectives {sum(b for _, b in moved) / 1e6:,.1f} MB ("
          + ", ".join(f"{k} {b / 1e6:,.1f}" for k, b in moved) + ")",
          f"  roofline {ms(r.seconds)} (compute {ms(r.compute_s)}, HBM {ms(r.hbm_s)}, ICI {ms(r.ici_s)}) against "
          f"an HBM floor of {ms(floor)} (weights {weights / 1e9:.2f} GB + KV cache {kv / 1e9:.2f} GB read once): "
          f"{r.seconds / floor:.1f}x the floor"]


def grpo_calls(g: config.GrpoCfg) -> dict[str, int]:
  """How often one GRPO step runs each program: log-probs per micro-batch for the reference pass (beta > 0) and
  the old-policy pass (more than one update per rollout), the update per mini-batch per iteration."""
  passes = (1 if g.beta else 0) + (grpo.updates_per_step(g) > 1)
  return {"GRPO prefill": 1, "GRPO decode": 1, "GRPO log-probs": passes * (g.prompts // g.micro_batch),
          "GRPO update": grpo.updates_per_step(g)}


def grpo_model_flops(cfg: Config, n_params: int) -> float:
  """A GRPO step's model FLOPs: 2·N per token forward (prefill, decode, log-prob passes), 6·N per token trained."""
  g, prompt, new = cfg.grpo, cfg.data.max_prompt_tokens, cfg.grpo.sampling.max_new_tokens
  calls = grpo_calls(g)
  forward = g.prompts * prompt + g.prompts * g.group * new + calls["GRPO log-probs"] * g.micro_batch * g.group * (
      prompt + new)
  return 2 * n_params * forward + 6 * n_params * calls["GRPO update"] * g.mini * g.group * (prompt + new)


def step_lines(cfg: Config, model_cfg: ModelConfig, seconds: dict[str, float], chips: int) -> list[str]:
  """The SFT and GRPO steps in roofline time and their MFU against the chips' peak."""
  n, d, peak = model_cfg.num_params, cfg.data, hlo_cost.V5E.flops * chips
  lines = []
  if "SFT step" in seconds:
    t, tokens = seconds["SFT step"], cfg.train.batch_size * (d.max_prompt_tokens + d.max_completion_tokens)
    lines.append(f"estimated SFT step: {t:.3f} s ({tokens} tokens), MFU {6 * n * tokens / (t * peak):.1%} "
                 "(model FLOPs 6·N·tokens)")
  calls = grpo_calls(cfg.grpo)
  if "GRPO merge" in seconds:  # the decode copy, built once per rollout
    calls = {"GRPO merge": 1, **calls}
  if all(name in seconds for name in calls):
    parts = {name: k * seconds[name] for name, k in calls.items()}
    total = sum(parts.values())
    lines.append(f"estimated GRPO step: {total:.3f} s = " + " + ".join(
        f"{name.removeprefix('GRPO ')} {calls[name]} x {seconds[name]:.3f}" for name in calls)
        + f", MFU {grpo_model_flops(cfg, n) / (total * peak):.1%} (model FLOPs 2·N per token forward, "
        f"6·N per token trained; decode at its full {cfg.grpo.sampling.max_new_tokens} tokens)")
  return lines


def time_report(cfg: Config, model_cfg: ModelConfig, mesh, p: Plan, results: list[Compiled]) -> list[str]:
  """Time on paper: each program's loop-weighted counts and roofline, the decode per token, the steps."""
  chip = hlo_cost.V5E
  lines = [f"\nTime on paper ({chip.name}: {chip.flops / 1e12:g} TFLOP/s bf16, {chip.hbm / 1e9:g} GB/s HBM, ICI "
           f"{chip.link / 1e9:g} GB/s per link and direction; roofline = max(compute, HBM) + collectives, not "
           "overlapped; counts per chip, each loop at its trip count)", TIME_HEAD]
  lines += [time_row(c) for c in results]
  decode = next((c for c in results if c.token is not None), None)
  if decode is not None:
    lines += decode_lines(decode.token, *decode_floor(cfg, model_cfg, mesh, p))
  seconds = {c.name: hlo_cost.roofline(c.cost).seconds for c in results if c.cost is not None}
  return lines + step_lines(cfg, model_cfg, seconds, mesh.devices.size)


def run_tpu(cfg: Config, tpu: str, hbm_gib: float = V5E_HBM_GIB, stand_in_model: bool = False,
            out=sys.stdout) -> bool:
  """Print the plan, then compile every program for the TPU slice `tpu`; whether all of them fit."""
  chips = tpu_devices(tpu)
  model_cfg = models.config_for(cfg.model)
  model_cfg = stand_in(model_cfg) if stand_in_model else model_cfg
  p = plan(cfg, model_cfg, len(chips), int(hbm_gib * GIB))
  print(table(p), file=out, flush=True)
  check_mesh(p, len(chips))  # before minutes of compiling programs the trainers would not run
  mesh = mesh_lib.make_mesh(cfg.mesh, chips)
  # held to less than the chip has when asked: the compiler then refuses what would not fit there
  options = {} if hbm_gib >= V5E_HBM_GIB else {"xla_tpu_max_hbm_size_mib": max(1, round(hbm_gib * 1024))}
  model = f"tiny {model_cfg.family} stand-in" if stand_in_model else cfg.model.spec
  print(f"\nTPU compiler (libtpu {importlib.metadata.version('libtpu')}): {tpu} = {TPUS[tpu][0]}, {model}, "
        f"{hbm_gib:g} GiB usable per chip\n{TPU_HEAD}", file=out, flush=True)
  results, trips = [], {DECODE_LOOP: cfg.grpo.sampling.max_new_tokens}  # a whole rollout: no row stops early
  for name, lowered in lower_all(cfg, model_cfg, mesh, p.decode_layout).items():
    results.append(compile_tpu(name, lowered, options, trips))
    print(tpu_row(results[-1], p), file=out, flush=True)
  fits, line = tpu_verdict(tpu, results, p)
  report = [*tpu_notes(cfg, model_cfg, mesh), *time_report(cfg, model_cfg, mesh, p, results), line]
  print("\n".join(report), file=out, flush=True)
  return fits


# --------------------------------------------------------------------------- CLI


def _positive(flags: dict, name: str, kind, default, least=0):
  """A flag's finite value above `least` (nan, inf and a memory of no whole byte are refused here, not deep inside)."""
  value = flags.get(name, default)
  flag = f"--{name.replace('_', '-')}"
  try:
    value = kind(value)
  except (TypeError, ValueError, OverflowError):
    raise UserError(f"{flag} must be a positive {kind.__name__}, got {value!r}") from None
  if not math.isfinite(value) or value <= least:
    bound = f"a finite number above {least:g}" if least else f"a positive finite {kind.__name__}"
    raise UserError(f"{flag} must be {bound}, got {flags.get(name, default)}")
  return value


def n_devices(cfg: Config, devices: int | None) -> int:
  """The devices the plan is for: --devices, else the recipe's mesh, else this host's."""
  return devices or (cfg.mesh.fsdp * cfg.mesh.tp if cfg.mesh.fsdp != -1 else jax.device_count())


def run(cfg: Config, devices: int | None = None, hbm_gib: float = V5E_HBM_GIB, out=sys.stdout) -> Plan:
  """Print the memory plan (and, with fake `devices`, the compile checks); returns the plan."""
  model_cfg = models.config_for(cfg.model)
  n = n_devices(cfg, devices)
  p = plan(cfg, model_cfg, n, int(hbm_gib * GIB))
  print(table(p), file=out)
  if devices and not p.errors:  # the trainers would refuse this mesh: nothing to compile
    for line in compile_checks(cfg, model_cfg, p.hbm):
      print(line, file=out)
  return p


@cli
def main(argv: list[str] | None = None):
  cfg, flags = config.parse_args(Config, sys.argv[1:] if argv is None else argv, FLAGS)
  devices = _positive(flags, "devices", int, 0) if "devices" in flags else None
  hbm_gib = _positive(flags, "hbm_gib", float, V5E_HBM_GIB, least=0.001)  # below 1 MiB nothing fits
  tpu, stand_in_model = flags.get("tpu"), "stand_in" in flags
  if tpu is not None and devices:
    raise UserError("--devices (fake CPU devices) and --tpu (the TPU compiler) are exclusive")
  if tpu is not None and hbm_gib > V5E_HBM_GIB:
    raise UserError(f"--hbm-gib with --tpu can only lower the {V5E_HBM_GIB} GiB a v5e chip's programs may use, "
                    f"got {hbm_gib:g}")
  if stand_in_model and tpu is None:
    raise UserError("--stand-in goes with --tpu (with --devices the stand-in is always compiled first)")
  if devices or tpu is not None:  # before jax starts its backend: CPU stays the default, TPU chips only compile
    jax.config.update("jax_platforms", "cpu")
  if devices:
    jax.config.update("jax_num_cpu_devices", devices)
  if tpu is not None:
    sys.exit(0 if run_tpu(cfg, tpu, hbm_gib, stand_in_model) else 1)
  p = run(cfg, devices, hbm_gib)
  sys.stdout.flush()
  check_mesh(p, n_devices(cfg, devices))
  sys.exit(0 if p.fits else 1)


if __name__ == "__main__":
  main()
