"""The programs a run compiles, lowered from abstract inputs on a mesh: the SFT step, GRPO's merge into the
decode copy, its prefill and decode loop, its log-prob pass and update step; and the CPU compile check
(`plan --devices N`) of the SFT step, with a tiny stand-in of the model family and with the real shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from tpu_reason import grpo, lora as lora_lib, mesh as mesh_lib, sft, sharding as sharding_lib, train as train_lib
from tpu_reason.config import Config
from tpu_reason.models.transformer import KVCache, ModelConfig, map_cache
from tpu_reason.plan.analytical import GIB, abstract_batch, base_params, grpo_batch, sft_batch
from tpu_reason.sampling import layout, sampler

# The compiled steps never run: skip LLVM's optimisations (the HLO passes and buffer assignment still run).
QUICK = {"xla_backend_optimization_level": 0}


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
  """A KV cache's leaves laid out by the table as `transformer.constrain_cache` lays them: rows over fsdp, kv heads
  over tp."""
  def one(x, axes):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, sharding_lib.spec(x.shape, axes, mesh)))

  return map_cache(one, cache)


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


def lower_all(cfg: Config, model_cfg: ModelConfig, mesh, decode: str = "merged",
              only: tuple[str, ...] | None = None) -> dict[str, jax.stages.Lowered]:
  """Every program a run compiles at its largest shapes (or those named in `only`), by name (the rollout's in
  the `decode` layout). A group of programs is traced only when one of them is wanted."""
  wanted = lambda *names: only is None or any(n in only for n in names)  # noqa: E731
  programs = {"SFT step": lower_sft_step(cfg, model_cfg, mesh)} if wanted("SFT step") else {}
  if wanted("GRPO merge", "GRPO prefill", "GRPO decode"):
    programs.update(lower_rollout(cfg, model_cfg, mesh, decode))
  if wanted("GRPO log-probs", "GRPO update"):
    programs.update(lower_grpo_train(cfg, model_cfg, mesh))
  return {name: p for name, p in programs.items() if only is None or name in only}
