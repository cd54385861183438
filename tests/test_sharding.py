"""Data parallelism proven from compiled HLO on 8 fake CPU devices (mesh fsdp 4 x tp 2).

After SPMD partitioning every shape in the HLO is a per-device shape. With the batch split
over fsdp, a dot must see this chip's rows (batch / 4), never the global batch, and FSDP's
all-gathers must rebuild weights, never another chip's activations. Sizes are chosen so
that the batch (40 rows, 10 per chip) matches no model dimension.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import TINY_JIT, TINY_LLAMA, tiny_params
from tpu_reason import (config, config_io, grpo, lora as lora_lib, mesh as mesh_lib, plan,
                        sharding as sharding_lib, train as train_lib)
from tpu_reason.config import Config
from tpu_reason.models.transformer import param_shapes

ROWS, PROMPT, COMPLETION = 40, 12, 20  # per chip 10 rows; no product of rows and a length collides
FSDP = 4
_SHAPE = re.compile(r"\b(?:f32|bf16|s32|pred|f16)\[([0-9,]*)\]")


def recipe(*overrides) -> Config:
  return config_io.load(Config, None, [
      "model.dtype=bfloat16", "lora.rank=4", f"mesh.fsdp={FSDP}", "mesh.tp=2", f"train.batch_size={ROWS}",
      f"data.max_prompt_tokens={PROMPT}", f"data.max_completion_tokens={COMPLETION}",
      f"data.completion_buckets=[{COMPLETION}]", "grpo.group=4", "grpo.prompts=10", "grpo.mini_batch=10",
      "grpo.micro_batch=10", f"grpo.sampling.max_new_tokens={COMPLETION}", "model.vocab_chunk=64", *overrides])


def ops(hlo: str, name: str) -> list[list[tuple[int, ...]]]:
  """For each `name` instruction of `hlo`: the shapes on its line (result first, then operands)."""
  out = []
  for line in hlo.splitlines():
    if re.search(rf"\s{re.escape(name)}\(", line):
      out.append([tuple(int(d) for d in m.split(",") if d) for m in _SHAPE.findall(line.split("metadata=")[0])])
  return out


def row_dims(shape: tuple[int, ...], rows: int) -> bool:
  """Whether `shape` has `rows` as a dimension, alone or flattened with the token axis."""
  return any(d in (rows, rows * PROMPT, rows * COMPLETION, rows * (PROMPT + COMPLETION)) for d in shape)


def activation_report(hlo: str) -> dict:
  """Counts of dots over the global batch / one chip's rows, and of all-gathers by what they collect."""
  dots = [s for s in ops(hlo, "dot") + ops(hlo, "convolution") if s]
  gathers = [s[0] for s in ops(hlo, "all-gather") + ops(hlo, "all-gather-start") if s]
  local = ROWS // FSDP
  return {
      "global_dots": sum(any(row_dims(x, ROWS) for x in s) for s in dots),
      "local_dots": sum(any(row_dims(x, local) for x in s) for s in dots),
      "row_gathers": sum(row_dims(s, ROWS) for s in gathers),  # other chips' rows
      "own_row_gathers": sum(row_dims(s, local) for s in gathers),  # model-dim pieces of this chip's rows
      "weight_gathers": sum(not (row_dims(s, local) or row_dims(s, ROWS)) for s in gathers),
  }


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compiled_sft_step(cfg: Config, m) -> str:
  with jax.set_mesh(m):
    return plan.lower_sft_step(cfg, TINY_LLAMA, m).compile(TINY_JIT).as_text()


def compiled_grpo_update(cfg: Config, m) -> str:
  g = cfg.grpo
  _, step_fn, _, state_sh = grpo.jitted(TINY_LLAMA, cfg, m)
  lora = plan.full_tree(lora_lib.shapes(TINY_LLAMA, cfg.lora), jnp.float32, m)
  optimizer = grpo.make_optimizer(cfg.grpo)
  state = _abstract(jax.eval_shape(lambda x: train_lib.init_state(x, optimizer, 0), lora), state_sh)
  params = plan.full_tree(param_shapes(TINY_LLAMA), jnp.bfloat16, m)
  batch = plan.grpo_batch(g.mini * g.group, PROMPT, COMPLETION)
  batch = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.rows_sharding(m, v.shape)), batch)
  with jax.set_mesh(m):
    return step_fn.lower(state, params, batch).compile(TINY_JIT).as_text()


@pytest.fixture(scope="module")
def mesh_4x2():
  return mesh_lib.make_mesh(config.MeshCfg(fsdp=FSDP, tp=2))


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["sft", "grpo"])
def test_each_chip_computes_only_its_rows(mesh_4x2, phase):
  cfg = recipe()
  hlo = (compiled_sft_step if phase == "sft" else compiled_grpo_update)(cfg, mesh_4x2)
  r = activation_report(hlo)
  assert r["local_dots"] > 20, r  # the forward and backward matmuls of both layers, on 10 rows
  assert r["global_dots"] == 0, r  # no chip multiplies the whole batch of 40 (main before the fix: 36)
  assert r["row_gathers"] == 0, r  # nothing gathers another chip's rows (before: 12)
  # the embedding lookup from a model-dim-sharded table: its [10, T, D/4] pieces cost far less
  # to gather than the [V, D] table would
  assert r["own_row_gathers"] <= 1, r
  assert r["weight_gathers"] >= 2 * 7, r  # FSDP gathers each layer's weights instead (before: 5)


def test_gathered_axes_keep_tp_and_drop_fsdp(mesh_4x2):
  shape, axes = param_shapes(TINY_LLAMA)["layers/gate"]
  assert sharding_lib.spec(shape[1:], axes[1:], mesh_4x2) == jax.sharding.PartitionSpec("fsdp", "tp")
  gathered = sharding_lib.gathered(axes[1:])
  assert sharding_lib.spec(shape[1:], gathered, mesh_4x2) == jax.sharding.PartitionSpec(None, "tp")


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((8, 4))
  assert sharding_lib.constrain(x, ("batch", "act_embed")) is x


def test_placement_hands_each_device_only_its_share(mesh_4x2):
  params = jax.tree.map(np.asarray, tiny_params(TINY_LLAMA))
  table = param_shapes(TINY_LLAMA)
  placed = sharding_lib.place(params, sharding_lib.shardings(table, mesh_4x2), jnp.bfloat16)
  for name, (shape, axes) in table.items():
    x = placed
    for part in name.split("/"):
      x = x[part]
    block = sharding_lib.shard_shape(shape, axes, mesh_4x2)
    assert x.dtype == jnp.bfloat16
    assert {s.data.shape for s in x.addressable_shards} == {block}, name
    assert len(x.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(placed["layers"]["q"], np.float32),
                                np.asarray(params["layers"]["q"].astype(jnp.bfloat16), np.float32))
