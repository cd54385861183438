"""Tests for `model.quant`: int8 / int4 base projections (QLoRA-style storage).

Host quantisation is checked against its error bound; the forward on quantised params
against the float forward on the same weights dequantised on the host (so the in-scan
widening is exact); placement on the 8-device mesh keeps the small format with scales
laid out like their weights; the backward keeps no wide copy of the weights; and a GRPO
run trains on a quantised base, its reference being the adapter-off quantised model.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import TINY_GEMMA3, TINY_LLAMA
from tests.test_grpo import first_batch, fresh_state, make_cfg as grpo_cfg, reuse_build
from tests.test_sft import make_cfg as sft_cfg, write_rows
from tpu_reason import (config_io, grpo, lora as lora_lib, losses, mesh as mesh_lib, models, plan, policy, sft,
                        sharding as sharding_lib)
from tpu_reason.config import Config, LoraCfg, MeshCfg
from tpu_reason.errors import UserError
from tpu_reason.models import quant, transformer as T

pytestmark = pytest.mark.slow  # whole trainer runs on quantised bases


def float_params(cfg, seed=0):
  return jax.tree.map(np.asarray, T.init_params(cfg, jax.random.key(seed)))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("n_in", [1, 2])
def test_quantize_is_within_half_a_step_of_every_weight(mode, n_in):
  w = np.random.default_rng(0).normal(size=(3, 4, 48, 5) if n_in == 2 else (3, 96, 6)).astype(np.float32)
  w[1] = 0.0  # an all-zero layer gets scale 1, not a division by zero
  values, scale = quant.quantize(w, mode, n_in)
  assert values.dtype == quant.DTYPES[mode] and scale.shape == quant.scale_shape(mode, w.shape, n_in)
  ints = values.astype(np.int32)
  assert np.abs(ints).max() == quant.QMAX[mode]  # the absmax of each group maps to the end of the range
  back = np.asarray(quant.dequantize(values, scale, n_in + 1, jnp.float32))
  step = np.asarray(quant.dequantize(np.ones_like(values), scale, n_in + 1, jnp.float32))
  assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
  assert np.all(back[1] == 0.0)


def test_int4_groups_run_along_the_last_input_axis():
  assert quant.group_size("int4", 576) == 96 and quant.group_size("int4", 1536) == 128
  assert quant.group_size("int8", 576) == 576
  # o's weight [L, N, H, D]: int8 one scale per output; int4 one per (head, group of head_dim, output)
  assert quant.scale_shape("int8", (2, 4, 64, 32), 2) == (2, 1, 1, 32)
  assert quant.scale_shape("int4", (2, 4, 256, 32), 2) == (2, 4, 2, 32)
  w = np.zeros((1, 256, 3), np.float32)
  w[0, 200, 1] = 7.0  # a large weight costs precision only in its own group of 128 inputs
  w[0, 10, 1] = 0.5
  values, scale = quant.quantize(w, "int4", 1)
  assert scale[0, 0, 1] == pytest.approx(0.5 / 7) and scale[0, 1, 1] == pytest.approx(1.0)
  assert values.astype(int)[0, 10, 1] == 7


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("base", [TINY_LLAMA, TINY_GEMMA3], ids=["llama", "gemma3"])
def test_quantized_forward_is_the_float_forward_on_the_dequantized_weights(mode, base):
  cfg = dataclasses.replace(base, quant=mode)
  params = float_params(base)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, base.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  lora = lora_lib.init(base, LoraCfg(rank=4), jax.random.key(2))
  lora = jax.tree.map(lambda x: x + 0.05, lora)  # non-zero B: the adapter must act on top of the widened weights
  run = lambda p, c: T.logits(p, c, T.forward(p, c, tokens, pos, lora=lora))  # noqa: E731
  quantized = run(T.quantize_params(params, cfg), cfg)
  np.testing.assert_allclose(quantized, run(T.as_computed(params, cfg), base), atol=2e-5)
  exact = run(params, base)
  err = float(jnp.abs(quantized - exact).max() / jnp.abs(exact).max())
  assert 0 < err < (0.05 if mode == "int8" else 0.6)  # 4 bits on Gaussian weights: coarse, not wrong


def test_placement_keeps_the_small_format_and_shards_scales_like_their_weights():
  cfg = dataclasses.replace(TINY_LLAMA, quant="int8")
  mesh = mesh_lib.make_mesh(MeshCfg(fsdp=4, tp=2))
  placed = models.place_params(float_params(TINY_LLAMA), cfg, mesh, jnp.float32)
  layers = placed["layers"]
  assert layers["gate"].dtype == jnp.int8 and layers["gate_scale"].dtype == jnp.float32
  assert placed["embed"].dtype == jnp.float32  # the embedding is not quantised
  # [L, D, F]: D over fsdp, F over tp; the scale [L, 1, F] keeps F over tp
  assert layers["gate"].sharding.spec == P(None, "fsdp", "tp")
  assert layers["gate_scale"].sharding.spec == P(None, None, "tp")
  wide = sharding_lib.bytes_per_device(models.place_params(float_params(TINY_LLAMA), TINY_LLAMA, mesh, jnp.float32))
  assert sharding_lib.bytes_per_device(placed) < 0.6 * wide


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_backward_keeps_no_wide_copy_of_the_weights(mode):
  """What the SFT backward saves is the same with quantised weights as with float ones: the layers are widened
  again in the backward, not stored wide (which would add every layer's float weights)."""
  cfg = config_io.load(Config, None, ["model.spec=tiny-llama", "lora.rank=4"])
  base = dataclasses.replace(TINY_LLAMA, vocab_size=256, embed_dim=64, hidden_dim=256, num_layers=4)
  batch = plan.sft_batch(cfg)(2, 16, 16)
  lora = plan.full_tree(lora_lib.shapes(base, cfg.lora), jnp.float32)
  saved = {}
  for c in (base, dataclasses.replace(base, quant=mode)):
    loss = functools.partial(plan.sft_loss(c, cfg), remat="none")
    saved[c.quant] = plan.residual_bytes(loss, lora, plan.base_params(c, jnp.float32), batch)
  layer_weights = sum(np.prod(s) for k, (s, _) in T.param_shapes(base).items() if k.startswith("layers/")) * 4
  assert saved[mode] < saved["none"] + layer_weights / 4


def test_plan_counts_the_base_weights_in_their_stored_format():
  cfg = config_io.load(Config, "qwen2.5-7b-s1k", [])
  sizes = {}
  for mode in ("none", "int8", "int4"):
    c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant=mode))
    p = plan.plan(c, dataclasses.replace(models.config_of(cfg.model.spec), quant=mode), 8, 16 * plan.GIB)
    sizes[mode] = p.phases[0].items["base params"]
  assert sizes["int4"] < 0.7 * sizes["int8"] and sizes["int8"] < 0.6 * sizes["none"]


def test_an_unknown_quant_is_a_one_line_user_error():
  with pytest.raises(UserError, match="model.quant must be one of none, int8, int4"):
    config_io.load(Config, None, ["model.quant=nf3"])


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
  return write_rows(tmp_path_factory.mktemp("quant_data") / "rows.jsonl", 24, 8, 4)


def test_grpo_trains_on_a_quantized_base_with_the_quantized_reference(tmp_path, data_path):
  tr = grpo.build(grpo_cfg(tmp_path, data_path, "model.quant=int4"))
  assert tr.model.cfg.quant == "int4" and tr.params["layers"]["q"].dtype == jnp.int4
  state = fresh_state(tr)
  arrays, _, _ = tr.rollout(state.lora, first_batch(tr), 0)
  wide = T.as_computed(models.load("tiny-llama").params, tr.model.cfg)  # the host weights dequantised
  direct = losses.completion_logprobs(wide, dataclasses.replace(tr.model.cfg, quant="none"),
                                      jax.tree.map(jnp.asarray, arrays.tokens()),
                                      temperature=tr.cfg.grpo.sampling.temperature)
  np.testing.assert_allclose(tr.score_logprobs(None, arrays), np.asarray(direct), atol=1e-5)
  with pytest.MonkeyPatch.context() as mp:
    reuse_build(mp, tr)
    summary = grpo.run(dataclasses.replace(tr.cfg, output_dir=str(tmp_path / "run")))
  train = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in train if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
  assert set(summary["after"]) >= {"accuracy", "format_accuracy"}


def test_sft_learns_on_an_int8_base_and_eval_loads_it_quantized(tmp_path, data_path):
  out = tmp_path / "sft"
  summary = sft.run(sft_cfg(out, data_path, "model.quant=int8"))
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  pol = policy.load(str(out))
  assert pol.model.cfg.quant == "int8"  # eval, chat and export see the base the adapter was trained on
