"""The analytical plan: per-device memory of the SFT step and of GRPO's two phases (rollouts, then the train
step), from abstract shapes only: no weights are loaded or allocated.

  base params, LoRA, Adam state  the sharding table applied to their shapes (`sharding.shard_shape`)
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

A setting a trainer would refuse on this mesh (a batch fsdp does not divide) is an error of the plan
(`Plan.errors`, `check_mesh`); the table still prints its memory's verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from tpu_reason import (config, grpo, lora as lora_lib, mesh as mesh_lib, sft, sharding as sharding_lib,
                        train as train_lib)
from tpu_reason.config import Config
from tpu_reason.data.batch import Batch, PackedBatch, RolloutBatch
from tpu_reason.errors import UserError
from tpu_reason.models.transformer import ModelConfig, init_cache, param_dtypes, param_shapes
from tpu_reason.sampling import layout
from tpu_reason.tree import flatten, unflatten

GIB = 2**30

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
