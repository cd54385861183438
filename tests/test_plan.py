"""Tests for tpu_reason.plan: per-device byte counts against hand arithmetic on a tiny config,
the residual tracer, the v5e-8 recipes' verdicts, and the CLI (with a fake-device compile)."""

import dataclasses
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import QUICK_XLA, TINY_LLAMA, tiny_params
from tpu_reason import config_io, lora as lora_lib, mesh as mesh_lib, plan, sharding as sharding_lib
from tpu_reason.config import Config
from tpu_reason.data.batch import PackedBatch
from tpu_reason.models.transformer import param_shapes

BF16, F32 = 2, 4
V5E8 = ["gemma3-1b-it-v5e8.yaml", "gemma2-2b-think.yaml", "qwen2.5-1.5b-gsm8k.yaml"]


def tiny_cfg(*overrides) -> Config:
  """TINY_LLAMA's numbers in a recipe: bf16, LoRA r4 on all 7 projections, mesh fsdp=4 x tp=2."""
  return config_io.load(Config, None, [
      "model.dtype=bfloat16", "lora.rank=4", "mesh.fsdp=4", "mesh.tp=2", "train.batch_size=8",
      "data.max_prompt_tokens=8", "data.max_completion_tokens=16", "data.completion_buckets=[16]", "grpo.group=4",
      "grpo.sampling.max_new_tokens=8", *overrides])


@pytest.fixture(scope="module")
def tiny_plan():
  return plan.plan(tiny_cfg(), TINY_LLAMA, 8, 16 * plan.GIB)


# TINY_LLAMA: V=128, D=32, F=64, L=2, N=4, K=2, H=8, tied embeddings; fsdp=4 splits the model
# dim D (32 -> 8), tp=2 splits vocab (128 -> 64), heads (4 -> 2), kv heads (2 -> 1) and mlp (64 -> 32).
PARAMS = (64 * 8  # embed [V/tp, D/fsdp]
          + 32 + 2 * 32 + 2 * 32  # final_norm, attn_norm, ffn_norm: replicated
          + 2 * 8 * 2 * 8  # q [L, D/fsdp, N/tp, H]
          + 2 * (2 * 8 * 1 * 8)  # k, v [L, D/fsdp, K/tp, H]
          + 2 * 2 * 8 * 8  # o [L, N/tp, H, D/fsdp]
          + 3 * (2 * 8 * 32)) * BF16  # gate, up, down [L, D/fsdp, F/tp] (down transposed)
LORA = (2 * 8 * 4 + 2 * 4 * 2 * 8  # q: A [L, D/fsdp, r], B [L, r, N/tp, H]
        + 2 * (2 * 8 * 4 + 2 * 4 * 1 * 8)  # k, v: B [L, r, K/tp, H]
        + 2 * 2 * 8 * 4 + 2 * 4 * 8  # o: A [L, N/tp, H, r], B [L, r, D/fsdp]
        + 2 * (2 * 8 * 4 + 2 * 4 * 32)  # gate, up: B [L, r, F/tp]
        + 2 * 32 * 4 + 2 * 4 * 8) * F32  # down: A [L, F/tp, r], B [L, r, D/fsdp]; f32 master weights
ADAM = 2 * LORA + 4 + 4  # mu and nu like the adapters; int32 step counts of adam and the lr schedule
LAYER = (32 * 2 * 8 + 2 * 32 * 1 * 8 + 2 * 8 * 32 + 3 * 32 * 32 + 2 * 32) * BF16  # one layer, D whole, tp split
# the merged decode copy: every layer whole over fsdp (D = 32), tp split; embed [V/tp, D], final norm
DECODE = 2 * LAYER + (64 * 32 + 32) * BF16


def kv(rows, slots):
  """k and v [L, rows, K/tp, slots, H] in bf16, valid (bool) and pos (int32) [rows, slots]."""
  return 2 * (2 * rows * 1 * slots * 8) * BF16 + rows * slots * (1 + 4)


def test_resident_bytes_match_hand_counts(tiny_plan):
  sft_step, rollout, train = tiny_plan.phases
  for phase in tiny_plan.phases:
    assert phase.items["base params"] == PARAMS
    assert phase.items["LoRA adapters"] == LORA
    assert phase.items["optimizer state"] == ADAM
  assert sft_step.items["gathered layer (FSDP)"] == train.items["gathered layer (FSDP)"] == LAYER
  # the rollout decodes on the merged copy (whole over fsdp) instead of gathering a layer at a time
  assert rollout.items["decode copy (merged)"] == DECODE and "gathered layer (FSDP)" not in rollout.items
  assert sft_step.items["LoRA gradients"] == LORA  # grad_accum=1
  assert train.items["LoRA gradients"] == 2 * LORA  # micro_batch 1 of grpo.prompts=2: accumulated
  assert "LoRA gradients" not in rollout.items and "activations" not in rollout.items


def test_rollout_bytes_match_hand_counts(tiny_plan):
  rollout = tiny_plan.phases[1]
  # grpo.prompts=2 do not split over fsdp=4: every chip keeps both prefixes; their 2 x G=4 = 8 rows do (2 each)
  assert rollout.items["KV cache"] == kv(2, 8) + kv(2, 8)  # prefix P=8; 2 sample rows of 8 tokens
  assert rollout.items["sampling logits"] == 2 * 64 * 4  # 2 rows x vocab 128 / tp 2, f32
  assert rollout.total == PARAMS + LORA + ADAM + DECODE + 2 * kv(2, 8) + 2 * 64 * 4
  assert tiny_plan.decode_layout == "merged"
  assert any("grpo.prompts=2 is not a multiple of fsdp=4" in n for n in tiny_plan.notes)
  split = plan.plan(tiny_cfg("grpo.prompts=4", "grpo.micro_batch=2"), TINY_LLAMA, 8, 16 * plan.GIB).phases[1]
  assert split.items["KV cache"] == kv(1, 8) + kv(4, 8)  # 4 prompts -> 1 per chip, 16 rows -> 4 per chip


def test_decode_floor_counts_what_a_token_reads(tiny_plan):
  """The HBM floor per generated token: the tp share of every weight, whole over fsdp (the decode copy), and
  the rows' KV cache; an untied input embedding is left out (a token reads one row of it)."""
  from tpu_reason.plan.tpu import decode_floor
  cfg, mesh = tiny_cfg(), mesh_lib.abstract_mesh(config_io.load(Config, None, ["mesh.fsdp=4", "mesh.tp=2"]).mesh, 8)
  weights, kv_bytes = decode_floor(cfg, TINY_LLAMA, mesh, tiny_plan)
  assert (weights, kv_bytes) == (DECODE, tiny_plan.phases[1].items["KV cache"])
  untied = dataclasses.replace(TINY_LLAMA, tie_embeddings=False)  # + lm_head [D, V/tp], - embed [V/tp, D]
  assert decode_floor(cfg, untied, mesh, tiny_plan)[0] == DECODE


@pytest.mark.slow
def test_the_decode_copy_falls_back_to_the_training_layout_where_it_does_not_fit(tiny_plan):
  """auto: merged when the copy fits beside the training state; else the training layout, said in a note."""
  rollout = tiny_plan.phases[1]
  tight = plan.plan(tiny_cfg(), TINY_LLAMA, 8, rollout.total - 1)
  assert tight.decode_layout == "train" and any("does not fit" in n for n in tight.notes)
  assert tight.phases[1].items["gathered layer (FSDP)"] == LAYER and "decode copy (merged)" not in tight.phases[1].items
  forced = plan.plan(tiny_cfg("mesh.decode_layout=train"), TINY_LLAMA, 8, 16 * plan.GIB)
  assert forced.decode_layout == "train" and not any("does not fit" in n for n in forced.notes)


@pytest.mark.slow
def test_abstract_bytes_equal_real_placement():
  """shard_shape's arithmetic is what device_put really puts on each of 8 devices."""
  cfg = tiny_cfg()
  m = mesh_lib.make_mesh(cfg.mesh)
  placed = sharding_lib.place(jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_params(TINY_LLAMA)),
                        sharding_lib.shardings(param_shapes(TINY_LLAMA), m))
  assert sharding_lib.bytes_per_device(placed) == PARAMS
  table = lora_lib.shapes(TINY_LLAMA, cfg.lora)
  adapters = sharding_lib.place(lora_lib.init(TINY_LLAMA, cfg.lora, jax.random.key(0)),
                                sharding_lib.shardings(table, m))
  assert sharding_lib.bytes_per_device(adapters) == LORA == plan.nbytes(plan.local_tree(table, jnp.float32, m))


def test_residual_bytes_counts_new_buffers_not_inputs():
  # d/dx sum(sin(x @ w)) needs cos(x @ w) [3, 5] f32 and w, which is an input: only the cosine is new
  x, w = jax.ShapeDtypeStruct((3, 4), jnp.float32), jax.ShapeDtypeStruct((4, 5), jnp.float32)
  assert plan.residual_bytes(lambda x, w: jnp.sum(jnp.sin(x @ w)), x, w) == 3 * 5 * 4
  # linear in x: the backward needs nothing new
  assert plan.residual_bytes(lambda x, w: jnp.sum(x @ w), x, w) == 0


@pytest.mark.slow
def test_activations_grow_linearly_with_rows_and_remat_saves_memory():
  act = {}
  for remat in ("none", "dots", "full"):
    cfg = tiny_cfg(f"model.remat={remat}")
    for rows in (1, 2, 3):
      act[(rows, remat)] = plan.activation_bytes(plan.sft_loss(TINY_LLAMA, cfg), TINY_LLAMA, cfg,
                                                 plan.abstract_batch(rows, 8, 16))
    assert act[(2, remat)] - act[(1, remat)] == act[(3, remat)] - act[(2, remat)] > 0
    # GRPO's loss on the same tokens keeps at least as much (its clipping and KL add per-token terms)
    assert plan.activation_bytes(plan.grpo_loss(TINY_LLAMA, cfg), TINY_LLAMA, cfg,
                                 plan.grpo_batch(2, 8, 16)) >= act[(2, remat)]
  per_row = {remat: act[(2, remat)] - act[(1, remat)] for remat in ("none", "dots", "full")}
  assert per_row["full"] >= 2 * 24 * 32 * BF16  # at least every layer's input [L, T=8+16, D] is kept
  assert per_row["full"] < per_row["dots"] < per_row["none"]  # dots keeps the projections, not attention


def test_batches_the_trainers_would_refuse_are_errors():
  p = plan.plan(tiny_cfg("grpo.group=2", "train.batch_size=6"), TINY_LLAMA, 8, plan.GIB)
  assert p.errors == ("SFT: micro-batch train.batch_size/grad_accum=6 must be a multiple of the fsdp mesh size 4",
                      "GRPO: grpo.micro_batch * grpo.group = 2 rows must be a multiple of the fsdp mesh size 4")
  assert not p.fits and all(ph.total < p.hbm for ph in p.phases)
  assert plan.table(p).splitlines()[-1].startswith("FIT: peak")  # the memory's verdict; the CLI exits 2 on the errors
  assert "the trainers refuse this mesh" in plan.table(p).splitlines()[-1]


def test_verdict_follows_the_hbm_size(tiny_plan):
  assert tiny_plan.fits and "FIT: peak" in plan.table(tiny_plan)
  small = dataclasses.replace(tiny_plan, hbm=tiny_plan.peak.total - 1)
  assert not small.fits
  text = plan.table(small)
  assert text.splitlines()[-1].startswith("NO FIT") and "NO FIT" in next(ln for ln in text.splitlines()
                                                                          if ln.startswith("fits"))


@pytest.mark.parametrize("recipe", V5E8)
@pytest.mark.slow
def test_v5e8_recipes_fit(recipe):
  cfg = config_io.load(Config, recipe)
  p = plan.run(cfg, hbm_gib=plan.V5E_HBM_GIB, out=io.StringIO())
  assert p.fits, plan.table(p)
  assert {ph.name for ph in p.phases} == {"SFT step", "GRPO rollout", "GRPO train"}
  assert all(ph.items["activations"] > 0 for ph in p.phases if ph.name != "GRPO rollout")


def _cli(*args, **env):
  return subprocess.run([sys.executable, "-m", "tpu_reason.plan", *args], capture_output=True, text=True,
                        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


@pytest.mark.slow
def test_cli_exit_status_and_errors():
  proc = _cli("--config", "gemma3-1b-it-v5e8.yaml", "--hbm-gib", "0.5")
  assert proc.returncode == 1 and "NO FIT: peak" in proc.stdout, proc.stderr
  proc = _cli("--config", "gemma3-1b-it-v5e8.yaml", "--devices", "zero")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: --devices must be a positive int, got 'zero'"]
  proc = _cli("--devices", "3", XLA_FLAGS=QUICK_XLA)  # the default recipe's batches do not divide over 3: one error line
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1:] == [
      "error: mesh error on 3 device(s): SFT micro-batch train.batch_size/grad_accum=4 must be a multiple of the fsdp "
      "mesh size 3; GRPO grpo.micro_batch * grpo.group = 4 rows must be a multiple of the fsdp mesh size 3"], proc.stderr
  assert "compile check" not in proc.stdout  # nothing compiled for a mesh the trainers refuse


@pytest.mark.slow
def test_cli_compiles_on_fake_devices():
  """The whole --devices path in a fresh process: 8 fake devices, stand-in compile, XLA's opinion."""
  proc = _cli("--config", "gemma3-1b-it-v5e8.yaml", "model.spec=tiny-llama", "--devices", "8",
              XLA_FLAGS=QUICK_XLA)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "compile check: SFT train step on 8 CPU devices, tiny llama stand-in, batch 16 x (256+512) tokens: OK" in out
  assert "XLA (CPU) buffers of the real SFT step per device" in out and out.rstrip().endswith(")")


@pytest.mark.slow
def test_packed_sft_step_compiles_on_the_mesh_and_is_planned_at_its_row_width():
  cfg, packed = tiny_cfg(), tiny_cfg("data.pack=true")
  mesh = mesh_lib.make_mesh(packed.mesh)
  args = plan.lower_sft_step(packed, TINY_LLAMA, mesh).compile().input_shardings[0][2]
  assert isinstance(args, PackedBatch)
  assert [f.name for f in dataclasses.fields(args)] == ["tokens_BxL", "segments_BxL", "positions_BxL", "target_at_BxC",
                                                       "completion_mask_BxC"]
  act = {c.data.pack: plan.activation_bytes(plan.sft_loss(TINY_LLAMA, c), TINY_LLAMA, c,
                                            plan.sft_batch(c)(2, 8, 16)) for c in (cfg, packed)}
  # the same 8 + 16 token positions per row and the vocabulary head on 16 of them: about the same residuals
  assert 0.9 * act[False] < act[True] < 1.1 * act[False]
