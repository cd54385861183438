"""`python -m tpu_reason.plan --config recipes/X.yaml [--devices 8] [--hbm-gib 16]`: will it fit?

Per-device memory of the SFT step and of GRPO's two phases (rollouts, then the train step),
from abstract shapes only: no weights are loaded or allocated.

  base params, LoRA, Adam state  the sharding table applied to their shapes (`mesh.shard_shape`)
  LoRA gradients                 one adapter-sized tree (two when micro-batches accumulate)
  gathered layer                 FSDP all-gathers one layer's weights at a time
  activations                    what autodiff saves for the backward pass of the trainer's own
                                 loss (`sft._loss`, `grpo._policy_loss`), traced with `jax.vjp` on
                                 the rows one device holds, plus one layer's worth of working memory
                                 while that layer is recomputed and differentiated (the reference
                                 and old-policy log-probs are forward-only)
  KV cache                       grpo.prompts prefixes + G samples each; the sampler does not split
                                 rollouts over the mesh, so every device holds all of them
  sampling logits                f32 logits of every rollout row

A setting a trainer would refuse on this mesh (a batch fsdp does not divide) is an error: NO FIT.

With `--devices N`, jax gets N fake CPU devices and the SFT train step is lowered and compiled
on the recipe's mesh twice: with a tiny stand-in of the model family at the recipe's batch and
sequence shapes (a quick shape and sharding check), and with the real model's abstract shapes,
whose XLA buffer assignment is a second opinion on the per-device total. CPU XLA keeps some
bf16 temporaries in f32, so that figure reads high.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp

from tpu_reason import config, grpo, lora as lora_lib, mesh as mesh_lib, models, sft, train as train_lib
from tpu_reason.config import Config
from tpu_reason.errors import UserError, cli
from tpu_reason.models.transformer import ModelConfig, flatten, init_cache, param_shapes, unflatten

GIB = 2**30
FLAGS = {"--devices": "devices", "--hbm-gib": "hbm_gib"}
V5E_HBM_GIB = 16.0
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

  @property
  def fits(self) -> bool:
    return not self.errors and all(p.total <= self.hbm for p in self.phases)

  @property
  def peak(self) -> Phase:
    return max(self.phases, key=lambda p: p.total)


# --------------------------------------------------------------------------- shapes


def nbytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def local_tree(table: dict, dtype, mesh) -> dict:
  """ShapeDtypeStructs of the block of every table entry that one device holds."""
  return unflatten({k: jax.ShapeDtypeStruct(mesh_lib.shard_shape(s, a, mesh), dtype) for k, (s, a) in table.items()})


def full_tree(table: dict, dtype, mesh=None) -> dict:
  """ShapeDtypeStructs of whole table entries (laid out over `mesh` when given)."""
  shard = flatten(mesh_lib.shardings(table, mesh)) if mesh is not None else {}
  return unflatten({k: jax.ShapeDtypeStruct(s, dtype, sharding=shard.get(k)) for k, (s, _) in table.items()})


def rows_per_device(rows: int, mesh) -> int:
  """Rows of a batch one device holds (all of them when fsdp does not divide the batch)."""
  return mesh_lib.shard_shape((rows,), ("batch",), mesh)[0]


def per_device_model(model_cfg: ModelConfig, mesh) -> ModelConfig:
  """The architecture one device computes: heads, kv heads and mlp split over tp as the table splits them."""
  split = lambda n, axis: mesh_lib.shard_shape((n,), (axis,), mesh)[0]  # noqa: E731
  return dataclasses.replace(model_cfg, num_heads=split(model_cfg.num_heads, "heads"),
                             num_kv_heads=split(model_cfg.num_kv_heads, "kv_heads"),
                             hidden_dim=split(model_cfg.hidden_dim, "mlp"))


def abstract_batch(rows: int, prompt: int, completion: int, sharding=None) -> dict:
  """The arrays of an SFT batch (see data.buckets) as ShapeDtypeStructs."""
  spec = lambda n, dt: jax.ShapeDtypeStruct((rows, n), dt, sharding=sharding)  # noqa: E731
  return {"prompt_tokens_BxP": spec(prompt, jnp.int32), "prompt_mask_BxP": spec(prompt, bool),
          "completion_tokens_BxC": spec(completion, jnp.int32), "completion_mask_BxC": spec(completion, bool)}


def grpo_batch(rows: int, prompt: int, completion: int) -> dict:
  """A GRPO update's micro-batch: rollout tokens plus advantages and stored log-probs."""
  per_row, per_token = jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((rows, completion), jnp.float32)
  return {**abstract_batch(rows, prompt, completion), "advantages_B": per_row, "num_tokens_B": per_row,
          "old_logp_BxC": per_token, "ref_logp_BxC": per_token}


# --------------------------------------------------------------------------- activations


def residual_bytes(fn, primal, *rest) -> int:
  """Bytes autodiff keeps for the backward of `fn` w.r.t. `primal` (new buffers, not inputs)."""
  closed = jax.make_jaxpr(lambda x, *r: jax.vjp(lambda y: fn(y, *r), x)[1])(primal, *rest)
  inputs = set(closed.jaxpr.invars)
  saved = [v for v in closed.jaxpr.outvars if isinstance(v, jax.extend.core.Var) and v not in inputs]
  return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in saved)


def sft_loss(model_cfg: ModelConfig, cfg: Config):
  """SFT's loss(lora, params, batch, remat=...) for these shapes."""
  return functools.partial(sft._loss, cfg=model_cfg, lora_scale=lora_lib.scale(cfg.lora),
                           dtype=jnp.dtype(cfg.model.dtype), chunk=cfg.train.vocab_chunk)


def grpo_loss(model_cfg: ModelConfig, cfg: Config):
  """GRPO's policy loss(lora, params, micro_batch, remat=...) for these shapes."""
  return functools.partial(grpo._policy_loss, cfg=model_cfg, g=cfg.grpo, lora_scale=lora_lib.scale(cfg.lora),
                           dtype=jnp.dtype(cfg.model.dtype), chunk=cfg.train.vocab_chunk,
                           on_policy=grpo.updates_per_step(cfg.grpo) == 1)


def activation_bytes(loss, model_cfg: ModelConfig, cfg: Config, batch: dict) -> int:
  """Backward-pass memory of `loss` on `batch`: saved residuals + one layer being differentiated."""
  dtype = jnp.dtype(cfg.model.dtype)
  params = full_tree(param_shapes(model_cfg), dtype)
  lora = full_tree(lora_lib.shapes(model_cfg, cfg.lora), dtype)
  kept = {remat: residual_bytes(functools.partial(loss, remat=remat), lora, params, batch) for remat in (False, True)}
  one_layer = (kept[False] - kept[True]) // model_cfg.num_layers
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
  lora_local = local_tree(lora_lib.shapes(model_cfg, cfg.lora), dtype, mesh)
  resident = {
      "base params": nbytes(local_tree(param_shapes(model_cfg), dtype, mesh)),
      "LoRA adapters": nbytes(lora_local),
      "optimizer state": nbytes(jax.eval_shape(train_lib.make_optimizer(t).init, lora_local)),
  }
  gathered = {}
  if mesh.shape["fsdp"] > 1:  # the whole of one layer (tp still splits it), all-gathered for its matmuls
    unsplit = mesh_lib.abstract_mesh(config.MeshCfg(fsdp=1, tp=mesh.shape["tp"]), mesh.shape["tp"])
    layers = {k: v for k, v in param_shapes(model_cfg).items() if k.startswith("layers/")}
    gathered = {"gathered layer (FSDP)": nbytes(local_tree(layers, dtype, unsplit)) // model_cfg.num_layers}

  def train_phase(name: str, loss, batch_of, rows: int, completion: int, accumulating: bool) -> Phase:
    per_dev = rows_per_device(rows, mesh)
    grads = nbytes(lora_local) * (2 if accumulating else 1)
    act = activation_bytes(loss, local, cfg, batch_of(per_dev, d.max_prompt_tokens, completion))
    items = {**resident, "LoRA gradients": grads, **gathered, "activations": act}
    remat = "remat" if cfg.model.remat else "no remat"
    return Phase(name, items, f"{per_dev} rows/device x ({d.max_prompt_tokens}+{completion}) tokens, {remat}")

  # the largest completion bucket is always max_completion_tokens (data.buckets.completion_buckets)
  sft_phase = train_phase("SFT step", sft_loss(local, cfg), abstract_batch, t.batch_size // t.grad_accum,
                          d.max_completion_tokens, t.grad_accum > 1)
  kv = (kv_cache_bytes(local, g.prompts, d.max_prompt_tokens, dtype)
        + kv_cache_bytes(local, g.prompts * g.group, g.max_new_tokens, dtype))
  rollout = Phase("GRPO rollout", {**resident, **gathered, "KV cache": kv,
                                   "sampling logits": g.prompts * g.group * model_cfg.vocab_size * 4},
                  f"{g.prompts} prompts x G={g.group} on every device, {d.max_prompt_tokens}+{g.max_new_tokens} tokens")
  if mesh.size > 1:
    notes.append(f"GRPO rollout: the sampler does not split rollouts over the mesh, so each of the {mesh.size} "
                 f"devices decodes all {g.prompts * g.group} rows")
  grpo_train = train_phase("GRPO train", grpo_loss(local, cfg), grpo_batch, g.micro_batch * g.group,
                           g.max_new_tokens, g.mini > g.micro_batch)

  lora_n = sum(math.prod(s) for s, _ in lora_lib.shapes(model_cfg, cfg.lora).values())
  title = (f"{cfg.name}: {cfg.model.spec} ({model_cfg.family}, {model_cfg.num_params / 1e9:.2f}B params, "
           f"{cfg.model.dtype}), LoRA r{cfg.lora.rank} on {cfg.lora.targets} ({lora_n / 1e6:.1f}M), "
           f"mesh fsdp={mesh.shape['fsdp']} x tp={mesh.shape['tp']}")
  return Plan(title, (sft_phase, rollout, grpo_train), hbm_bytes, tuple(notes), tuple(errors))


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
  verdict = "FIT" if p.fits else "NO FIT"
  lines.append(f"{verdict}: peak {p.peak.total / GIB:.2f} GiB ({p.peak.name}) of {p.hbm / GIB:.2f} GiB HBM per device")
  return "\n".join(lines)


# --------------------------------------------------------------------------- compile checks


def stand_in(model_cfg: ModelConfig) -> ModelConfig:
  """A tiny model of the same family and vocabulary: compiles in seconds, same code paths."""
  window = model_cfg.sliding_window
  return dataclasses.replace(
      model_cfg, embed_dim=64, hidden_dim=128, num_layers=2, num_heads=4,
      num_kv_heads=1 if model_cfg.num_kv_heads == 1 else 2, head_dim=16,
      sliding_window=None if window is None else min(window, 8), global_every=min(model_cfg.global_every, 2))


def lower_sft_step(cfg: Config, model_cfg: ModelConfig, mesh) -> jax.stages.Lowered:
  """`sft`'s jitted train step lowered on `mesh` for the recipe's batch shapes (abstract inputs)."""
  dtype = jnp.dtype(cfg.model.dtype)
  optimizer = train_lib.make_optimizer(cfg.train)
  step, state_sh = sft.jit_train_step(cfg, model_cfg, optimizer, mesh)
  lora = full_tree(lora_lib.shapes(model_cfg, cfg.lora), dtype, mesh)
  state = jax.eval_shape(functools.partial(train_lib.init_state, optimizer=optimizer, seed=cfg.train.seed), lora)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
  params = full_tree(param_shapes(model_cfg), dtype, mesh)
  batch = abstract_batch(cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_completion_tokens,
                         mesh_lib.batch_sharding(mesh, 2))
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


# --------------------------------------------------------------------------- CLI


def _positive(flags: dict, name: str, kind, default):
  value = flags.get(name, default)
  try:
    value = kind(value)
  except (TypeError, ValueError):
    raise UserError(f"--{name.replace('_', '-')} must be a positive {kind.__name__}, got {value!r}") from None
  if value <= 0:
    raise UserError(f"--{name.replace('_', '-')} must be a positive {kind.__name__}, got {value!r}")
  return value


def run(cfg: Config, devices: int | None = None, hbm_gib: float = V5E_HBM_GIB, out=sys.stdout) -> Plan:
  """Print the memory plan (and, with fake `devices`, the compile checks); returns the plan."""
  model_cfg = models.config_of(cfg.model.spec)
  n = devices or (cfg.mesh.fsdp * cfg.mesh.tp if cfg.mesh.fsdp != -1 else jax.device_count())
  p = plan(cfg, model_cfg, n, int(hbm_gib * GIB))
  print(table(p), file=out)
  if devices:
    for line in compile_checks(cfg, model_cfg, p.hbm):
      print(line, file=out)
  return p


@cli
def main(argv: list[str] | None = None):
  cfg, flags = config.parse_args(Config, sys.argv[1:] if argv is None else argv, FLAGS)
  devices = _positive(flags, "devices", int, 0) if "devices" in flags else None
  if devices:  # fake CPU devices, before jax starts its backend
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)
  p = run(cfg, devices, _positive(flags, "hbm_gib", float, V5E_HBM_GIB))
  sys.exit(0 if p.fits else 1)


if __name__ == "__main__":
  main()
