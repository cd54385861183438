"""Every TPU recipe dry-runs on 8 fake CPU devices with a tiny stand-in of its model family."""

import functools
import glob

import jax
import jax.numpy as jnp
import pytest

from tpu_reason import config, grpo, lora as lora_lib, mesh as mesh_lib, models, sft
from tpu_reason.models.transformer import param_shapes

TPU_RECIPES = sorted(p for p in glob.glob(str(config.RECIPES / "*.yaml")) if "cpu" not in p)
STAND_IN = {"gemma": "tiny-gemma3"}  # otherwise tiny-llama


@pytest.mark.parametrize("path", TPU_RECIPES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_tpu_recipe_lowers_its_train_step(path):
  cfg = config.load(config.Config, path)
  spec = next((v for k, v in STAND_IN.items() if k in cfg.model.spec.lower()), "tiny-llama")
  model = models.load(spec)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert mesh.devices.size == jax.device_count() == 8
  assert (cfg.train.batch_size // cfg.train.grad_accum) % mesh.shape["fsdp"] == 0
  dtype = jnp.dtype(cfg.model.dtype)
  params = mesh_lib.put(jax.tree.map(lambda x: jnp.asarray(x, dtype), model.params),
                        mesh_lib.shardings(param_shapes(model.cfg), mesh))
  lora = mesh_lib.put(lora_lib.init(model.cfg, cfg.lora, jax.random.key(0), dtype),
                      mesh_lib.shardings(lora_lib.shapes(model.cfg, cfg.lora), mesh))
  opt = sft.make_optimizer(cfg.train)
  state = sft.init_state(lora, opt, 0)
  b, p, c = cfg.train.batch_size, cfg.data.max_prompt_tokens, max(cfg.data.completion_buckets or (cfg.data.max_completion_tokens,))
  batch = {
      "prompt_tokens_BxP": jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=mesh_lib.batch_sharding(mesh, 2)),
      "prompt_mask_BxP": jax.ShapeDtypeStruct((b, p), bool, sharding=mesh_lib.batch_sharding(mesh, 2)),
      "completion_tokens_BxC": jax.ShapeDtypeStruct((b, c), jnp.int32, sharding=mesh_lib.batch_sharding(mesh, 2)),
      "completion_mask_BxC": jax.ShapeDtypeStruct((b, c), bool, sharding=mesh_lib.batch_sharding(mesh, 2)),
  }
  step = jax.jit(functools.partial(sft._train_step, cfg=model.cfg, optimizer=opt, lora_scale=lora_lib.scale(cfg.lora),
                                   dtype=dtype, remat=cfg.model.remat, chunk=cfg.train.vocab_chunk,
                                   accum=cfg.train.grad_accum))
  lowered = step.lower(state, params, batch)
  out_state, metrics = lowered.out_info
  assert metrics["loss"].shape == () and out_state.lora["layers"]["q"]["a"].shape == state.lora["layers"]["q"]["a"].shape


@pytest.mark.parametrize("path", TPU_RECIPES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_tpu_recipe_lowers_its_grpo_update(path):
  cfg = config.load(config.Config, path)
  g = cfg.grpo
  spec = next((v for k, v in STAND_IN.items() if k in cfg.model.spec.lower()), "tiny-llama")
  model = models.load(spec)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert (g.micro_batch * g.group) % mesh.shape["fsdp"] == 0
  dtype = jnp.dtype(cfg.model.dtype)
  params = mesh_lib.put(jax.tree.map(lambda x: jnp.asarray(x, dtype), model.params),
                        mesh_lib.shardings(param_shapes(model.cfg), mesh))
  optimizer, step_fn, logp_fn, state_sh = grpo.jitted(model.cfg, cfg, mesh)
  lora = lora_lib.init(model.cfg, cfg.lora, jax.random.key(0))
  state = jax.device_put(sft.init_state(lora, optimizer, 0), state_sh)
  rows, p, c = g.mini * g.group, cfg.data.max_prompt_tokens, g.max_new_tokens

  def arr(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(mesh, len(shape)))

  batch = {"prompt_tokens_BxP": arr((rows, p), jnp.int32), "prompt_mask_BxP": arr((rows, p), bool),
           "completion_tokens_BxC": arr((rows, c), jnp.int32), "completion_mask_BxC": arr((rows, c), bool),
           "advantages_B": arr((rows,), jnp.float32), "num_tokens_B": arr((rows,), jnp.float32),
           "old_logp_BxC": arr((rows, c), jnp.float32), "ref_logp_BxC": arr((rows, c), jnp.float32)}
  out_state, metrics = step_fn.lower(state, params, batch).out_info
  assert metrics["kl"].shape == () and out_state.lora["layers"]["q"]["a"].shape == lora["layers"]["q"]["a"].shape
  micro = {k: arr((g.micro_batch * g.group,) + v.shape[1:], v.dtype) for k, v in batch.items() if k.endswith(("P", "C"))}
  assert logp_fn.lower(None, params, micro).out_info.shape == (g.micro_batch * g.group, c)
