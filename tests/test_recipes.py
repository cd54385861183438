"""Every TPU recipe dry-runs on 8 fake CPU devices with a tiny stand-in of its model family."""

import glob

import jax
import jax.numpy as jnp
import pytest

from tpu_reason import (config, config_io, grpo, lora as lora_lib, mesh as mesh_lib, models, plan,
                        sharding as sharding_lib, train as train_lib)
from tpu_reason.data.batch import RolloutBatch
from tpu_reason.models.transformer import param_shapes

TPU_RECIPES = sorted(p for p in glob.glob(str(config_io.RECIPES / "*.yaml")) if "cpu" not in p)


def stand_in(cfg):
  """The recipe's model family shrunk (offline: hf.KNOWN_CONFIGS), checked to keep what matters."""
  real = models.config_of(cfg.model.spec)
  tiny = plan.stand_in(real)
  assert (tiny.family, tiny.vocab_size, tiny.qkv_bias, tiny.final_softcap) == (
      real.family, real.vocab_size, real.qkv_bias, real.final_softcap)
  return tiny


@pytest.mark.parametrize("path", TPU_RECIPES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_tpu_recipe_lowers_its_train_step(path):
  cfg = config_io.load(config.Config, path)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert mesh.devices.size == jax.device_count() == 8
  assert (cfg.train.batch_size // cfg.train.grad_accum) % mesh.shape["fsdp"] == 0
  lowered = plan.lower_sft_step(cfg, stand_in(cfg), mesh)
  (state, _, batch), _ = lowered.args_info
  out_state, metrics = lowered.out_info
  assert metrics["loss"].shape == () and out_state.lora["layers"]["q"]["a"].shape == state.lora["layers"]["q"]["a"].shape
  assert batch.completion_tokens_BxC.shape == (cfg.train.batch_size, cfg.data.max_completion_tokens)
  assert all(a.donated for a in jax.tree.leaves(state))  # the state buffers are reused in place


@pytest.mark.parametrize("path", TPU_RECIPES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_tpu_recipe_lowers_its_grpo_update(path):
  cfg = config_io.load(config.Config, path)
  g = cfg.grpo
  tiny = stand_in(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert (g.micro_batch * g.group) % mesh.shape["fsdp"] == 0
  dtype = jnp.dtype(cfg.model.dtype)
  params = plan.full_tree(param_shapes(tiny), dtype, mesh)
  optimizer, step_fn, logp_fn, state_sh = grpo.jitted(tiny, cfg, mesh)
  lora = plan.full_tree(lora_lib.shapes(tiny, cfg.lora), dtype, mesh)
  state = jax.eval_shape(lambda a: train_lib.init_state(a, optimizer, 0), lora)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
  rows, p, c = g.mini * g.group, cfg.data.max_prompt_tokens, g.sampling.max_new_tokens

  def arr(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.rows_sharding(mesh, shape))

  batch = RolloutBatch(arr((rows, p), jnp.int32), arr((rows, p), bool), arr((rows, c), jnp.int32), arr((rows, c), bool),
                       advantages_B=arr((rows,), jnp.float32), num_tokens_B=arr((rows,), jnp.float32),
                       old_logp_BxC=arr((rows, c), jnp.float32), ref_logp_BxC=arr((rows, c), jnp.float32),
                       sampler_logp_BxC=arr((rows, c), jnp.float32))
  out_state, metrics = step_fn.lower(state, params, batch).out_info
  assert metrics["kl"].shape == () and out_state.lora["layers"]["q"]["a"].shape == lora["layers"]["q"]["a"].shape
  micro = jax.tree.map(lambda v: arr((g.micro_batch * g.group,) + v.shape[1:], v.dtype), batch.tokens())
  assert logp_fn.lower(None, params, micro).out_info.shape == (g.micro_batch * g.group, c)
