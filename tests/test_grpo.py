"""Tests for tpu_reason.grpo: fresh keys per step, the reference without a weight copy,
updates that follow the advantage sign, exact resume, init from an SFT run, curriculum.

One Trainer from the real `grpo.build` on a `tiny-llama` (random weights, real SmolLM2
tokenizer) with one-line arithmetic prompts; 8 fake devices, so a micro-batch is 2 prompts
x G=4 = 8 rows. The GRPO maths itself is tested by hand in test_grpo_math.py.
"""

import dataclasses
import functools
import gc
import inspect
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import one_device_env
from tests.test_sft import host, write_rows
from tpu_reason import (checkpoint, config, config_io, grpo, lora as lora_lib, loop, losses, rewards, runs, sft,
                        train as train_lib)
from tpu_reason.config import Config
from tpu_reason.data.batch import RolloutBatch
from tpu_reason.errors import UserError
from tpu_reason.models import transformer


def make_cfg(out, data_path, *overrides) -> Config:
  return config_io.load(Config, None, cfg_args(out, data_path, *overrides))


def cfg_args(out, data_path, *overrides) -> list[str]:
  return [
      f"output_dir={out}", "model.spec=tiny-llama", "data.source=jsonl", f"data.path={data_path}",
      "data.size=32", "data.eval_size=4", "data.system_prompt=", "data.max_prompt_tokens=56",
      "grpo.init=base", "grpo.steps=2", "grpo.prompts=4", "grpo.micro_batch=2", "grpo.sampling.max_new_tokens=8",
      "grpo.optim.lr=1e-2", "grpo.optim.warmup_steps=0", "grpo.save_every=1", "grpo.eval_every=1",
      "train.eval_generate=2", "train.eval_max_new_tokens=4", "grpo.sampling.temperature=1.0",
      "grpo.sampling.top_k=0", "grpo.eval_tasks=[]", *overrides]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
  return write_rows(tmp_path_factory.mktemp("grpo_data") / "rows.jsonl", 24, 8, 4)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, data_path):
  tr = grpo.build(make_cfg(tmp_path_factory.mktemp("grpo"), data_path))
  assert tr.mesh.shape == {"fsdp": 8, "tp": 1}
  assert len(tr.train) == 32 and len(tr.eval) == 4 and tr.init == "base"
  return tr


def fresh_state(tr):
  ckpts = checkpoint.Checkpoints(tr.out / "none", keep_last=1)
  try:
    state, _ = loop.initial_state(tr, ckpts)
  finally:
    ckpts.close()
  return state


def first_batch(tr):
  return next(tr.batches(0))


def reuse_build(monkeypatch, tr, **changes):
  monkeypatch.setattr(grpo.cli, "build", lambda cfg: dataclasses.replace(tr, cfg=cfg, out=cfg.resolved_output_dir(), **changes))


# --------------------------------------------------------------------------- pure pieces


def test_reward_metrics_by_hand():
  total = [1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 2.0]
  parts = {"format": [1, 1, 1, 1, 0, 1, 0, 1], "outcome": [0, 0, 0, 0, 0, 1, 0, 1]}
  m = grpo.reward_metrics(total, parts, group=4)
  assert m["reward"] == 1.0
  assert m["reward_std"] == pytest.approx((0.0 + 1.0) / 2)  # group stds 0 and 1
  assert m["frac_reward_zero_std"] == 0.5
  assert m["rewards/format/mean"] == 0.75 and m["rewards/outcome/mean"] == 0.25
  assert m["rewards/outcome/std"] == pytest.approx(np.sqrt(0.25 * 0.75))


def test_reward_metrics_skip_rows_a_reward_does_not_apply_to():
  # process applies to the first group only (its prompt has checkpoints): mean over those 2 rows
  parts = {"format": [1, 1, 0, 0], "process": [0.5, 1.0, None, None]}
  m = grpo.reward_metrics([1.5, 2.0, 0.0, 0.0], parts, group=2)
  assert m["rewards/process/mean"] == 0.75 and m["rewards/process/std"] == 0.25 and m["rewards/process/rows"] == 2
  assert m["rewards/format/mean"] == 0.5 and "rewards/format/rows" not in m
  m = grpo.reward_metrics([1.0, 0.0], {"process": [None, None]}, group=2)  # a task without checkpoints
  assert m["rewards/process/rows"] == 0 and "rewards/process/mean" not in m and "rewards/process/std" not in m


def test_advantage_rewards_sum_or_normalize_each():
  g = config.GrpoCfg(group=4, reward_weights=(1.0, 1.0, 2.0))  # format, process, outcome
  parts = {"format": [1, 0, 1, 0], "process": [None] * 4, "outcome": [0, 0, 1, 1]}
  total = [1.0, 0.0, 3.0, 2.0]  # format + 2 * outcome; process does not apply
  np.testing.assert_array_equal(grpo.advantage_rewards(total, parts, g), total)
  # format -> [1,-1,1,-1], process -> 0, outcome -> [-1,-1,1,1] (x2): [-1,-3,3,1] (eps 1e-4 shrinks it a hair)
  each = dataclasses.replace(g, reward_aggregation="normalize_each")
  np.testing.assert_allclose(grpo.advantage_rewards(total, parts, each), [-1, -3, 3, 1], rtol=1e-3)


def test_informative_groups_by_hand():
  # stds: .5, 0, ~7e-8 (below the 1e-6 of frac_reward_zero_std), .433
  r = [1, 0, 0, 1, 2, 2, 2, 2, 0.5, 0.5, 0.5, 0.5 + 1.6e-7, 0, 0, 0, 1]
  np.testing.assert_array_equal(grpo.informative_groups(r, 4), [True, False, False, True])
  np.testing.assert_array_equal(grpo.informative_groups(r, 4, ddof=1), [True, False, False, True])
  assert grpo.reward_metrics(r, {}, 4)["frac_reward_zero_std"] == 0.5  # the same tolerance


def test_keep_groups_by_hand():
  informative, prompts = [True, False, True, True, True], ["a", "b", "c", "a", "d"]
  # "c" is in the batch already, the second "a" repeats the first, "b" has no signal
  np.testing.assert_array_equal(grpo.keep_groups(informative, prompts, {"c"}, 5), [1, 0, 0, 0, 1])
  np.testing.assert_array_equal(grpo.keep_groups(informative, prompts, set(), 2), [1, 0, 1, 0, 0])  # room for 2
  taken = {"c"}
  grpo.keep_groups(informative, prompts, taken, 5)
  assert taken == {"c"}  # the caller's set is left alone


def test_fill_batch_by_hand():
  # group 2, 3 prompts a step; round A keeps its 2nd group, round B its 1st: one filler group
  a = {"prompt_tokens_BxP": np.array([[0, 1], [0, 1], [0, 2], [0, 2]]),
       "prompt_mask_BxP": np.array([[0, 1], [0, 1], [0, 1], [0, 1]], bool),
       "completion_tokens_BxC": np.array([[5, 6], [7, 0], [8, 0], [9, 9]]),
       "completion_mask_BxC": np.array([[1, 1], [1, 0], [1, 0], [1, 1]], bool),
       "advantages_B": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}
  b = {"prompt_tokens_BxP": np.array([[3, 3, 4]] * 2 + [[0, 0, 5]] * 2),
       "prompt_mask_BxP": np.array([[1, 1, 1]] * 2 + [[0, 0, 1]] * 2, bool),
       "completion_tokens_BxC": np.array([[1, 2, 3, 4], [1, 0, 0, 0], [6, 0, 0, 0], [6, 0, 0, 0]]),
       "completion_mask_BxC": np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool),
       "advantages_B": np.array([2.0, -2.0, 0.0, 0.0], np.float32)}
  a, b = RolloutBatch(**a), RolloutBatch(**b)
  out = grpo.fill_batch([a, b], [np.array([False, True]), np.array([True, False])], prompts=3, group=2)
  np.testing.assert_array_equal(out.prompt_tokens_BxP, [[0, 0, 2], [0, 0, 2], [3, 3, 4], [3, 3, 4],
                                                           [0, 0, 1], [0, 0, 1]])  # left-padded to 3
  np.testing.assert_array_equal(out.prompt_mask_BxP.sum(1), [1, 1, 3, 3, 1, 1])
  np.testing.assert_array_equal(out.completion_tokens_BxC, [[8, 0, 0, 0], [9, 9, 0, 0], [1, 2, 3, 4],
                                                               [1, 0, 0, 0], [5, 6, 0, 0], [7, 0, 0, 0]])
  np.testing.assert_array_equal(out.completion_mask_BxC.sum(1), [1, 2, 4, 1, 0, 0])  # the filler: masked
  np.testing.assert_array_equal(out.advantages_B, [0.5, -0.5, 2.0, -2.0, 0.0, 0.0])
  # the filler adds nothing: dapo's token-mean is the kept rows' own; grpo's mean over rows counts 6 rows
  per_token = jnp.asarray(np.arange(24, dtype=np.float32).reshape(6, 4))
  mask = jnp.asarray(out.completion_mask_BxC)
  kept = float(losses.aggregate(per_token[:4], mask[:4], "dapo"))
  assert float(losses.aggregate(per_token, mask, "dapo")) == kept == (0 + 4 + 5 + 8 + 9 + 10 + 11 + 12) / 8
  assert float(losses.aggregate(per_token, mask, "grpo")) == pytest.approx(
      float(losses.aggregate(per_token[:4], mask[:4], "grpo")) * 4 / 6)
  # every group kept: the rows as they were, no filler
  full = grpo.fill_batch([a], [np.array([True, True])], prompts=2, group=2)
  for key, value in vars(a).items():
    np.testing.assert_array_equal(getattr(full, key), value)


def test_completion_metrics():
  m = grpo.completion_metrics(np.array([3, 8, 5, 8]), np.array([False, True, False, True]))
  assert m == {"completions/mean_length": 6.0, "completions/min_length": 3.0, "completions/max_length": 8.0,
               "completions/clipped_ratio": 0.5}


def test_rollout_key_is_fresh_each_step_and_reproducible():
  k = [jax.random.key_data(grpo.rollout_key(0, s)) for s in range(4)]
  assert len({tuple(np.asarray(x).ravel()) for x in k}) == 4
  np.testing.assert_array_equal(k[2], jax.random.key_data(grpo.rollout_key(0, 2)))
  assert not np.array_equal(k[0], jax.random.key_data(grpo.rollout_key(1, 0)))
  # resample rounds: round 0 is the step's key, later rounds their own
  rounds = [np.asarray(jax.random.key_data(grpo.rollout_key(0, 2, r))).tobytes() for r in range(3)]
  assert rounds[0] == np.asarray(k[2]).tobytes() and len(set(rounds)) == 3
  assert not set(rounds[1:]) & {np.asarray(x).tobytes() for x in k}  # nor another step's


def test_optimizer_counts_updates():
  cfg = config_io.load(Config, None, ["grpo.steps=10", "grpo.prompts=4", "grpo.mini_batch=2", "grpo.num_iterations=3",
                                      "grpo.optim.warmup_steps=1", "grpo.optim.lr=1e-5"])
  g = cfg.grpo
  assert grpo.updates_per_step(g) == 6  # 2 mini-batches x 3 iterations
  lr = train_lib.schedule(g.optim, g.steps, grpo.updates_per_step(g))
  # warmup over the first step's 6 updates, the peak at update 6, cosine to 10 % at update 60
  assert float(lr(0)) == pytest.approx(1e-5 / 6) and float(lr(6)) == pytest.approx(1e-5)
  assert float(lr(5)) < 1e-5 and float(lr(60)) == pytest.approx(1e-6)


@pytest.mark.parametrize("override,needle", [
    (["grpo.prompts=3", "grpo.mini_batch=2"], "grpo.prompts=3"),
    (["grpo.group=1"], "grpo.group"),
    (["grpo.rewards=[format]"], "same length"),
    (["grpo.loss=ppo"], "grpo.loss"),
    (["grpo.curriculum_steps=3"], "curriculum"),
    (["grpo.rewards=[format,nope,outcome]"], "grpo.rewards must be one of format, format_soft, process, outcome, got .nope."),
    (["grpo.max_resample_rounds=-1"], "grpo.max_resample_rounds"),
])
def test_bad_grpo_config_is_a_user_error(override, needle):
  with pytest.raises(UserError, match=needle):
    config_io.load(Config, None, override)


# --------------------------------------------------------------------------- rollouts


@pytest.mark.slow
def test_rollouts_are_fresh_every_step_and_reproducible(trainer):
  tr = trainer
  state, batch = fresh_state(tr), first_batch(tr)
  a0, m0, t0 = tr.rollout(state.lora, batch, 0)
  b0, _, _ = tr.rollout(state.lora, batch, 0)
  a1, _, t1 = tr.rollout(state.lora, batch, 1)
  np.testing.assert_array_equal(a0.completion_tokens_BxC, b0.completion_tokens_BxC)
  assert not np.array_equal(a0.completion_tokens_BxC, a1.completion_tokens_BxC)
  # the G samples of one prompt differ from each other too (one prefill, G streams)
  rows = a0.completion_tokens_BxC.reshape(4, 4, -1)
  assert all(len({r.tobytes() for r in group}) > 1 for group in rows)
  assert a0.prompt_tokens_BxP.shape == (16, 56) and a0.completion_tokens_BxC.shape == (16, 8)
  np.testing.assert_array_equal(a0.prompt_tokens_BxP[::4], batch.arrays.prompt_tokens_BxP)
  assert len(t0) == 16 and all(t.startswith(tr.schema.primer) for t in t0)
  assert m0["completions/max_length"] <= 8
  # advantages are zero-mean within every group
  np.testing.assert_allclose(a0.advantages_B.reshape(4, 4).sum(1), 0.0, atol=1e-5)


@pytest.mark.slow
def test_truncated_completions_can_be_masked(trainer):
  tr = trainer
  state, batch = fresh_state(tr), first_batch(tr)
  arrays, m, _ = tr.rollout(state.lora, batch, 0)
  masked = dataclasses.replace(tr, cfg=dataclasses.replace(
      tr.cfg, grpo=dataclasses.replace(tr.cfg.grpo, mask_truncated_completions=True)))
  arrays_m, _, _ = masked.rollout(state.lora, batch, 0)
  lengths = arrays.completion_mask_BxC.sum(1)
  truncated = lengths == 8  # a random model rarely stops within 8 tokens
  assert truncated.any() and m["completions/clipped_ratio"] == truncated.mean()
  assert not arrays_m.completion_mask_BxC[truncated].any()
  np.testing.assert_array_equal(arrays_m.completion_mask_BxC[~truncated], arrays.completion_mask_BxC[~truncated])


# --------------------------------------------------------------------------- reference and updates


@pytest.mark.slow
def test_reference_is_the_adapter_off_without_a_weight_copy(trainer):
  tr = trainer
  state, batch = fresh_state(tr), first_batch(tr)
  gc.collect()
  before = {id(a): a for a in jax.live_arrays()}
  base_ids = {id(x) for x in jax.tree.leaves(tr.params)}
  assert base_ids <= set(before)  # the trainer's one copy
  state, m, _ = tr.step(state, batch, 0)
  jax.block_until_ready(state.lora)
  gc.collect()
  after = jax.live_arrays()
  base_shapes = {(x.shape, x.dtype) for x in jax.tree.leaves(tr.params)} - {
      (x.shape, x.dtype) for x in jax.tree.leaves(state.lora)}
  new = [a for a in after if id(a) not in before and (a.shape, a.dtype) in base_shapes]
  assert not new, [a.shape for a in new]
  grown = sum(a.nbytes for a in after) - sum(a.nbytes for a in before.values())
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(tr.params))
  assert grown < 0.1 * params_bytes, (grown, params_bytes)
  # a fresh adapter (B = 0) is the reference policy exactly: the first step's KL is 0
  assert m["kl"] == 0.0 and m["clip_ratio/low_mean"] == 0.0 and np.isfinite(m["loss"])
  assert int(state.step) == grpo.updates_per_step(tr.cfg.grpo) == 1


@pytest.mark.slow
def test_trim_prompts_keeps_every_prompt_token(trainer):
  batch = first_batch(trainer)
  pad = lambda x: np.pad(x, ((0, 0), (40, 0)))  # noqa: E731
  a = batch.arrays
  padded = dataclasses.replace(batch, arrays=dataclasses.replace(a, prompt_tokens_BxP=pad(a.prompt_tokens_BxP),
                                                                 prompt_mask_BxP=pad(a.prompt_mask_BxP)))
  trimmed = grpo.trim_prompts(padded)
  width = trimmed.arrays.prompt_mask_BxP.shape[1]
  assert batch.arrays.prompt_mask_BxP.sum(1).max() <= width < 56 + 40 and width & (width - 1) == 0
  assert not padded.arrays.prompt_mask_BxP[:, :-width].any()  # only shared left padding went
  np.testing.assert_array_equal(trimmed.arrays.prompt_tokens_BxP, padded.arrays.prompt_tokens_BxP[:, -width:])
  assert trimmed.answer == batch.answer


@pytest.mark.slow
def test_logprobs_do_not_depend_on_padding_width(trainer):
  """Trimmed batches score exactly like padded ones: the rollout may cut padding columns."""
  tr = trainer
  state = fresh_state(tr)
  arrays, _, _ = tr.rollout(state.lora, first_batch(tr), 0)
  pad = lambda x, left, right: np.pad(x, ((0, 0), (left, right)))  # noqa: E731
  wide = dataclasses.replace(arrays, prompt_tokens_BxP=pad(arrays.prompt_tokens_BxP, 8, 0),
                             prompt_mask_BxP=pad(arrays.prompt_mask_BxP, 8, 0),
                             completion_tokens_BxC=pad(arrays.completion_tokens_BxC, 0, 8),
                             completion_mask_BxC=pad(arrays.completion_mask_BxC, 0, 8))
  mask = arrays.completion_mask_BxC
  narrow_logp, wide_logp = tr.score_logprobs(state.lora, arrays), tr.score_logprobs(state.lora, wide)
  np.testing.assert_allclose(wide_logp[:, :mask.shape[1]][mask], narrow_logp[mask], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss,level", [("dr_grpo", "token"), ("grpo", "sequence")])
def test_policy_loss_does_not_depend_on_padding_width(trainer, loss, level):
  """The same rollout gives the same loss at its trimmed width and padded 8 columns wider: dr_grpo
  divides by grpo.sampling.max_new_tokens, and GSPO's sequence ratio averages over real tokens only."""
  tr = trainer
  state = fresh_state(tr)
  arrays, _, _ = tr.rollout(state.lora, first_batch(tr), 0)
  c = arrays.completion_tokens_BxC.shape[1]
  cols = ("completion_tokens_BxC", "completion_mask_BxC", "sampler_logp_BxC")
  wide = dataclasses.replace(arrays, **{k: np.pad(getattr(arrays, k), ((0, 0), (0, 8))) for k in cols},
                             advantages_B=np.where(np.arange(16) % 2 == 0, 1.0, -1.0).astype(np.float32))
  wide = dataclasses.replace(wide, ref_logp_BxC=tr.score_logprobs(None, wide))
  noise = 0.05 * np.random.default_rng(0).standard_normal(wide.ref_logp_BxC.shape)
  # off-policy: ratios differ from 1
  wide = dataclasses.replace(wide, old_logp_BxC=(wide.ref_logp_BxC + noise).astype(np.float32))
  narrow = dataclasses.replace(wide, **{k: getattr(wide, k)[:, :c] for k in (*cols, "ref_logp_BxC", "old_logp_BxC")})
  g = dataclasses.replace(tr.cfg.grpo, loss=loss, importance_level=level)
  fn = jax.jit(functools.partial(grpo.loss, cfg=tr.model.cfg, g=g, lora_scale=tr.lora_scale, dtype=tr.dtype,
                                 remat="none", chunk=tr.cfg.model.vocab_chunk, on_policy=False))

  def loss_at(a):
    mb = dataclasses.replace(a, num_tokens_B=np.full(16, a.completion_mask_BxC.sum(), np.float32))
    return float(fn(state.lora, tr.params, tr.place(mb))[0])

  narrow_loss = loss_at(narrow)
  # the loss is a small difference of O(1) terms (advantages ±1): f32 round-off is absolute, ~1e-7 per term
  assert narrow_loss != 0.0 and loss_at(wide) == pytest.approx(narrow_loss, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_overlong_penalty_and_normalize_each_in_the_rollout(trainer):
  tr = trainer
  state, batch = fresh_state(tr), first_batch(tr)
  g = dataclasses.replace(tr.cfg.grpo, overlong_buffer=4, reward_aggregation="normalize_each")
  shaped = dataclasses.replace(tr, cfg=dataclasses.replace(tr.cfg, grpo=g))
  arrays, m, _ = shaped.rollout(state.lora, batch, 0)
  _, plain, _ = tr.rollout(state.lora, batch, 0)  # the same key: the same completions
  lengths = arrays.completion_mask_BxC.sum(1)
  penalty = -np.clip((lengths - (8 - 4)) / 4, 0.0, 1.0)  # cap 8, buffer 4
  assert m["rewards/overlong/mean"] == pytest.approx(penalty.mean())
  assert m["reward"] == pytest.approx(plain["reward"] + penalty.mean(), abs=1e-6)
  np.testing.assert_allclose(arrays.advantages_B.reshape(4, 4).sum(1), 0.0, atol=1e-5)


def test_rollouts_record_keeps_the_reasoning_only_by_length_when_redacted(trainer):
  text = "<reasoning>\n4 + 4 = 8, so it is 8\n</reasoning>\n<answer>8</answer>"  # the tests' schema: reasoning
  assert trainer.record(["a"], [text]) == {"ids": ["a"], "completions": [text]}
  redacted = dataclasses.replace(trainer, cfg=dataclasses.replace(trainer.cfg, redact_thoughts=True))
  (line,) = redacted.record(["a"], [text])["completions"]
  assert line == trainer.schema.redact(text) and "4 + 4" not in line and "chars of reasoning redacted" in line


@pytest.mark.slow
def test_reference_logprobs_equal_the_base_model(trainer):
  tr = trainer
  arrays, _, _ = tr.rollout(fresh_state(tr).lora, first_batch(tr), 0)
  ref = tr.score_logprobs(None, arrays)
  placed = tr.place(arrays.tokens())
  direct = losses.completion_logprobs(tr.params, tr.model.cfg, placed, temperature=tr.cfg.grpo.sampling.temperature)
  np.testing.assert_allclose(ref, np.asarray(direct), atol=1e-5)


@pytest.mark.slow
def test_updates_follow_the_advantage_sign(trainer):
  tr = trainer
  state = fresh_state(tr)
  arrays, _, _ = tr.rollout(state.lora, first_batch(tr), 0)
  # a nonzero adapter so every gradient flows (B = 0 blocks the A gradients of a fresh one)
  key = jax.random.key(1)
  lora = jax.tree.map(lambda x: 0.05 * jax.random.normal(key, x.shape, x.dtype), state.lora)
  state = dataclasses.replace(state, lora=jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), lora, state.lora))
  adv = np.where(np.arange(16) % 2 == 0, 1.0, -1.0).astype(np.float32)
  arrays = dataclasses.replace(arrays, advantages_B=adv)
  c = arrays.completion_tokens_BxC.shape[1]
  arrays = dataclasses.replace(arrays, ref_logp_BxC=tr.score_logprobs(None, arrays),
                               old_logp_BxC=np.zeros((16, c), np.float32))
  mask = arrays.completion_mask_BxC
  before = (tr.score_logprobs(state.lora, arrays) * mask).sum(1)
  state, m = tr.update(state, arrays)
  after = (tr.score_logprobs(state.lora, arrays) * mask).sum(1)
  assert np.isfinite(m["loss"]) and m["kl"] > 0
  assert (after - before)[adv > 0].mean() > 0 > (after - before)[adv < 0].mean()


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def straight_run(trainer, tmp_path_factory):
  out = tmp_path_factory.mktemp("straight")
  with pytest.MonkeyPatch.context() as mp:
    reuse_build(mp, trainer, tasks={"again": trainer.eval})  # a second held-out set (grpo.eval_tasks)
    summary = grpo.run(dataclasses.replace(trainer.cfg, output_dir=str(out)))
  return out, summary


@pytest.mark.slow
def test_run_writes_all_outputs(straight_run):
  out, summary = straight_run
  for name in ("config.yaml", "run.json", "metrics.jsonl", "rollouts.jsonl", "rewards.png", "summary.json",
               "before.json"):
    assert (out / name).exists(), name
  assert runs.info(out) == {"trainer": "grpo", "init": "base"}
  rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/format/mean", "rewards/outcome/std",
              "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/low_mean",
              "clip_ratio/high_mean", "tokens_per_s/rollout", "tokens_per_s/train", "time/rollout",
              "time/reference", "time/train", "loss", "grad_norm", "lr"):
    assert key in train[0], key
  assert set(summary["before"]) == set(summary["after"]) >= {"accuracy", "format_accuracy", "reward",
                                                             "reward/format", "mean_completion_tokens"}
  # the second set is scored before and after, under its name, and not at eval_every (step 1)
  evals = {r["step"]: r for r in rows if r["split"] == "eval"}
  assert sorted(evals) == [0, 1, 2] and not any(k.startswith("again/") for k in evals[1])
  for scores in (summary["before"], summary["after"]):
    assert {k for k in scores if k.startswith("again/")} == {f"again/{k}" for k in (*grpo.trainer.TASK_METRICS, "rows")}
    # the same prompts, greedy, by the same weights: the same scores as the run's own held-out set
    assert scores["again/accuracy"] == scores["accuracy"] and scores["again/rows"] == scores["rows"] == 2
  assert "first_20pct_reward" in summary and summary["last_step"] == 2
  # these prompts have no checkpoints: the process reward applies to no row and says so
  assert train[0]["rewards/process/rows"] == 0 and "rewards/process/mean" not in train[0]
  assert "reward/process" not in summary["after"]
  assert len((out / "rollouts.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(trainer, straight_run, tmp_path, monkeypatch, capsys):
  out_a, _ = straight_run
  out = tmp_path / "run"
  cfg = dataclasses.replace(trainer.cfg, output_dir=str(out))
  real = grpo.Trainer.rollout

  def crash_at_step_1(self, lora, batch, step):
    if step == 1:
      raise KeyboardInterrupt
    return real(self, lora, batch, step)

  reuse_build(monkeypatch, trainer)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(grpo.Trainer, "rollout", crash_at_step_1)
    with pytest.raises(KeyboardInterrupt):
      grpo.run(cfg)
  summary = grpo.run(cfg)
  assert "resumed from" in capsys.readouterr().out and summary["last_step"] == 2
  a, b = train_rows(out_a), train_rows(out)
  assert [a[s]["reward"] for s in (1, 2)] == [b[s]["reward"] for s in (1, 2)]
  assert a[2]["loss"] == b[2]["loss"]
  (lora_a, meta_a), (lora_b, meta_b) = saved(trainer, out_a, 2), saved(trainer, out, 2)
  assert meta_a["step"] == meta_b["step"] == 2 and meta_a["data_position"] == meta_b["data_position"] == 2
  for x, y in zip(jax.tree.leaves(lora_a), jax.tree.leaves(lora_b)):
    np.testing.assert_array_equal(x, y)


def train_rows(path) -> dict[int, dict]:
  return {r["step"]: r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
          if r["split"] == "train"}


def saved(tr, path, step: int):
  """(host LoRA, meta) of the `last` checkpoint `step` of the run at `path`."""
  ckpts = checkpoint.Checkpoints(path / "checkpoints", 2)
  try:
    state, meta = ckpts.restore(step, fresh_state(tr))
  finally:
    ckpts.close()
  return host(state.lora), meta


# --------------------------------------------------------------------------- dynamic sampling


def sparse_reward(prompts, completions, weights, **columns):
  """Stands in for rewards.score: a 0/1 reward that varies within a group only for the prompts "What is a plus
  b?" with a % 3 == 0 (a third of them); every other group scores 0 throughout, with nothing to learn."""
  def one(prompt, text):
    a = int(re.search(r"What is (\d+) plus", prompt).group(1))
    return float(zlib.crc32(text.encode()) % 2) if a % 3 == 0 else 0.0

  values = [one(p, t) for p, t in zip(prompts, completions)]
  return values, {"format": values, "process": [None] * len(values), "outcome": [0.0] * len(values)}


def dynamic_cfg(tr, out) -> Config:
  g = dataclasses.replace(tr.cfg.grpo, steps=3, dynamic_sampling=True, max_resample_rounds=2)
  return dataclasses.replace(tr.cfg, output_dir=str(out), grpo=g, train=dataclasses.replace(tr.cfg.train, keep_last=3))


@pytest.fixture(scope="module")
def dynamic_run(trainer, tmp_path_factory):
  out = tmp_path_factory.mktemp("dynamic")
  with pytest.MonkeyPatch.context() as mp:
    reuse_build(mp, trainer)
    mp.setattr(rewards, "score", sparse_reward)
    summary = grpo.run(dynamic_cfg(trainer, out))
  return out, summary


@pytest.mark.slow
def test_dynamic_sampling_keeps_informative_groups_and_counts_them(trainer, dynamic_run):
  out, summary = dynamic_run
  assert summary["last_step"] == 3
  rows = train_rows(out)
  records = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
  position, counts = 0, []
  for step, rec in zip((1, 2, 3), records):
    m = rows[step]
    drawn, kept, dropped, rounds = (m[f"dynamic/{k}"] for k in ("groups_drawn", "groups_kept", "groups_dropped",
                                                                 "rounds"))
    assert drawn == kept + dropped == 4 * (1 + rounds) and kept <= 4 and 0 <= rounds <= 2
    assert round(m["frac_reward_zero_std"] * drawn) <= dropped and (m["time/resample"] > 0) == (rounds > 0)
    assert np.isfinite(m["loss"]) and np.isfinite(m["kl"])
    # rollouts.jsonl: every group drawn, and which were kept: distinct prompts with a reward that varies
    assert rec["step"] == step and len(rec["ids"]) == drawn and len(rec["completions"]) == 4 * drawn
    kept_ids = [i for i, k in zip(rec["ids"], rec["kept"]) if k]
    assert len(kept_ids) == len(set(kept_ids)) == kept and all((int(i[1:]) + 2) % 3 == 0 for i in kept_ids)
    position += 1 + rounds
    counts.append((kept, rounds))
    # the checkpoint records the batches drawn, not the steps: a resumed run reads on from there
    assert saved(trainer, out, step)[1]["data_position"] == position
  # this seed and reward cover each way a step ends (a change in sampling may need another reward rule):
  # full before the cap, full at it, short at it (trained with a masked filler group)
  assert (4, 1) in counts and (4, 2) in counts and any(k < 4 for k, _ in counts), counts


@pytest.mark.slow
def test_dynamic_sampling_resumes_exactly(trainer, dynamic_run, tmp_path, monkeypatch, capsys):
  """Interrupted in step 2's first resample round, after the stream had moved on: the resumed run ends as
  the uninterrupted one did (steps 2 and 3 run again from the step-1 checkpoint and its data position)."""
  out_a, _ = dynamic_run
  out = tmp_path / "run"
  real = grpo.Trainer.sample_round

  def crash_in_a_resample(self, lora, batch, step, round=0):
    if (step, round) == (1, 1):
      raise KeyboardInterrupt
    return real(self, lora, batch, step, round)

  reuse_build(monkeypatch, trainer)
  monkeypatch.setattr(rewards, "score", sparse_reward)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(grpo.Trainer, "sample_round", crash_in_a_resample)
    with pytest.raises(KeyboardInterrupt):
      grpo.run(dynamic_cfg(trainer, out))
  summary = grpo.run(dynamic_cfg(trainer, out))
  assert "resumed from" in capsys.readouterr().out and summary["last_step"] == 3
  a, b = train_rows(out_a), train_rows(out)
  keys = ("reward", "loss", "dynamic/groups_drawn", "dynamic/groups_kept", "dynamic/rounds")
  assert [[a[s][k] for k in keys] for s in (1, 2, 3)] == [[b[s][k] for k in keys] for s in (1, 2, 3)]
  (lora_a, meta_a), (lora_b, meta_b) = saved(trainer, out_a, 3), saved(trainer, out, 3)
  assert meta_a["data_position"] == meta_b["data_position"] > 2
  for x, y in zip(jax.tree.leaves(lora_a), jax.tree.leaves(lora_b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sampling_budget_ends_the_run_where_the_completions_run_out(trainer, tmp_path, monkeypatch):
  """grpo.max_completions = 5 prompt batches: however many a dynamic step draws, the run stops at 5, saves
  that step and evaluates it as a finished run."""
  cfg = dynamic_cfg(trainer, tmp_path / "budget")
  cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, steps=10, max_completions=5 * 4 * 4))
  reuse_build(monkeypatch, trainer)
  monkeypatch.setattr(rewards, "score", sparse_reward)
  summary = grpo.run(cfg)
  rows = train_rows(tmp_path / "budget")
  last = max(rows)
  assert summary["finished"] and summary["last_step"] == last < 10 and summary["after"]
  assert sum(r["dynamic/groups_drawn"] for r in rows.values()) == 5 * 4  # not a batch more
  assert saved(trainer, tmp_path / "budget", last)[1]["data_position"] == 5
  evals = [json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in evals if r["split"] == "eval"]  # eval_every=1: each step, then the after eval
  assert steps == [0, *range(1, last + 1), last]


def latest_saved(out) -> int | None:
  ckpts = checkpoint.Checkpoints(out / "checkpoints", 3)
  try:
    return ckpts.latest_step()
  finally:
    ckpts.close()


# The child runs what a user runs: one CPU device. So it must not import a test module (tests.conftest would give
# it 8 fake devices, and every array op of its run would be sharded 8 ways); the reward is copied in as source.
KILL_DRIVER = f"""
import os, re, sys, time, zlib
from tpu_reason import grpo, rewards

{inspect.getsource(sparse_reward)}
rewards.score = sparse_reward
real = grpo.Trainer.sample_round

def hang_in_a_resample(self, lora, batch, step, round=0):
  if os.environ.get("HANG") and (step, round) == (1, 1):  # step 2's first resample round
    print("hanging", flush=True)
    time.sleep(3600)
  return real(self, lora, batch, step, round)

grpo.Trainer.sample_round = hang_in_a_resample
grpo.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_dynamic_sampling_killed_with_sigkill_resumes_exactly(trainer, data_path, tmp_path):
  """kill -9 while step 2 resamples (no handler runs, nothing is saved on the way out): the same command
  resumes from step 1's checkpoint and its data position and ends with an uninterrupted run's adapters."""
  driver = tmp_path / "driver.py"
  driver.write_text(KILL_DRIVER)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = one_device_env(PYTHONPATH=root)

  def launch(out, **extra):
    # no held-out evals: what resumes is the training, and each eval compiles and runs its own generation
    args = cfg_args(out, data_path, "grpo.steps=3", "grpo.dynamic_sampling=true", "grpo.max_resample_rounds=2",
                    "train.keep_last=3", "data.eval_size=0", "train.eval_generate=0")
    return subprocess.Popen([sys.executable, str(driver), *args], cwd=root, env={**env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  ref, out = tmp_path / "ref", tmp_path / "killed"
  proc = launch(out, HANG="1")
  try:
    # step 1 is done (and its checkpoint written) before step 2 samples; the progress bar shares the line
    seen, deadline = "", time.time() + 600
    while "hanging" not in seen and proc.poll() is None and time.time() < deadline:
      if select.select([proc.stdout], [], [], 1.0)[0]:
        seen += os.read(proc.stdout.fileno(), 1 << 16).decode(errors="replace")
    assert "hanging" in seen and proc.poll() is None, f"the run did not reach step 2's resample: {seen[-2000:]}"
    deadline = time.time() + 60
    while latest_saved(out) != 1 and time.time() < deadline:
      time.sleep(0.5)  # Orbax may still be finishing step 1's write in the background
  finally:
    proc.send_signal(signal.SIGKILL)  # also when an assert failed: never leave the hanging run behind
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  logs = [run.communicate(timeout=600)[0] for run in (launch(out), launch(ref))]
  assert "resumed from" in logs[0] and "step 1\n" in logs[0], logs[0]
  assert "Traceback" not in logs[0] + logs[1] and latest_saved(ref) == latest_saved(out) == 3, logs
  a, b = train_rows(ref), train_rows(out)
  keys = ("reward", "loss", "dynamic/groups_drawn", "dynamic/groups_kept", "dynamic/rounds")
  assert [[a[s][k] for k in keys] for s in (1, 2, 3)] == [[b[s][k] for k in keys] for s in (1, 2, 3)]
  (lora_a, meta_a), (lora_b, meta_b) = saved(trainer, ref, 3), saved(trainer, out, 3)
  assert meta_a["data_position"] == meta_b["data_position"] > 3  # step 2 or 3 resampled
  for x, y in zip(jax.tree.leaves(lora_a), jax.tree.leaves(lora_b)):
    np.testing.assert_array_equal(x, y)


def test_curriculum_comes_first(trainer):
  cfg = dataclasses.replace(trainer.cfg, grpo=dataclasses.replace(
      trainer.cfg.grpo, curriculum=("basic_arithmetic",), curriculum_steps=2))
  tr = dataclasses.replace(trainer, cfg=cfg, warmup=trainer.eval)  # 4 stand-in "easy" prompts
  easy = {e.id for e in trainer.eval}
  it = tr.batches(0)
  ids = [set(next(it).id) for _ in range(3)]
  assert ids[0] <= easy and ids[1] <= easy and not ids[2] & easy
  # resuming mid-curriculum or after it yields the same batches
  assert [set(b.id) for b in grpo.rollout.take(tr.batches(1), 2)] == ids[1:]


# --------------------------------------------------------------------------- init from an SFT run


def fake_sft_run(root, name, spec, lora, trainer_name="sft", finished=True, data=()):
  run = root / name
  cfg = config_io.load(Config, None, [f"model.spec={spec}", "lora.rank=16", "lora.alpha=32", *data])
  config_io.save(cfg, run)
  runs.write_info(run, trainer_name)
  if lora is not None:
    state = sft.init_state(lora, sft.make_optimizer(cfg.train.optim, cfg.train.max_steps), 0)
    ckpts = checkpoint.Checkpoints(run / "checkpoints", 1, *runs.BEST[trainer_name])
    ckpts.save_best(2, state, {"step": 2}, {"eval_loss": 0.5, "reward": 0.5})
    zero = jax.tree.map(jnp.zeros_like, state)  # "last" differs: the best one must be loaded
    ckpts.save(3, zero, {"step": 3})
    ckpts.close()
  if finished:
    (run / "summary.json").write_text("{}")
  return run


def test_latest_finished_sft_run_is_found(tmp_path):
  fake_sft_run(tmp_path, "a", "tiny-llama", None)
  time.sleep(0.01)
  newest = fake_sft_run(tmp_path, "b", "tiny-llama", None)
  time.sleep(0.01)
  fake_sft_run(tmp_path, "c", "tiny-gemma3", None)  # other model
  fake_sft_run(tmp_path, "d", "tiny-llama", None, trainer_name="grpo")  # not SFT
  fake_sft_run(tmp_path, "e", "tiny-llama", None, finished=False)  # still running / crashed
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "summary.json").write_text("{}")  # no run.json
  assert runs.latest_finished("tiny-llama", "sft", tmp_path) == newest
  assert runs.latest_finished("smollm2-135m", "sft", tmp_path) is None


def test_eval_tasks_are_the_sft_runs_held_out_set_and_reasoning_gym_tasks(trainer, tmp_path):
  sft_rows = write_rows(tmp_path / "sft_rows.jsonl", 6, 0, 3)
  run = fake_sft_run(tmp_path, "sft", "tiny-llama", None, data=["data.source=jsonl", f"data.path={sft_rows}",
                                                                   "data.eval_size=3", "data.system_prompt="])
  g = dataclasses.replace(trainer.cfg.grpo, eval_tasks=("init", config.MULTI_STEP_TASK))
  cfg = dataclasses.replace(trainer.cfg, grpo=g, data=dataclasses.replace(trainer.cfg.data, max_prompt_tokens=160))
  tasks = grpo.cli.eval_task_prompts(cfg, str(run), trainer.model)
  assert list(tasks) == ["sft_rows.jsonl", config.MULTI_STEP_TASK]
  held_out = [f"What is {i + 2} plus {(i * 7) % 11 + 1}?" for i in (6, 7, 8)]  # the file's last 3 rows
  assert len(tasks["sft_rows.jsonl"]) == 3 and all(q in r.prompt_text for q, r in zip(held_out, tasks["sft_rows.jsonl"]))
  assert len(tasks[config.MULTI_STEP_TASK]) == 4  # data.eval_size
  assert list(grpo.cli.eval_task_prompts(cfg, "base", trainer.model)) == [config.MULTI_STEP_TASK]  # no SFT run
  own = dataclasses.replace(g, eval_tasks=("init",))  # the SFT run's set is the run's own: scored once
  same = fake_sft_run(tmp_path, "same", "tiny-llama", None, data=["data.source=jsonl", f"data.path={cfg.data.path}"])
  assert grpo.cli.eval_task_prompts(dataclasses.replace(cfg, grpo=own), str(same), trainer.model) == {}


def test_init_task_before_is_the_sft_runs_after_when_scored_alike(trainer, tmp_path, monkeypatch):
  """GRPO's "before" on the SFT run's held-out rows is that run's own "after" (summary.json), not generated again,
  when it scored the same rows with the adapters GRPO merged and the same settings; else it is generated."""
  sft_rows = write_rows(tmp_path / "sft_rows.jsonl", 6, 0, 3)
  data = ["data.source=jsonl", f"data.path={sft_rows}", "data.eval_size=3", "data.system_prompt="]
  cfg = dataclasses.replace(trainer.cfg, grpo=dataclasses.replace(trainer.cfg.grpo, eval_tasks=("init",)),
                            data=dataclasses.replace(trainer.cfg.data, max_prompt_tokens=160))
  after = {"eval_loss": 0.4, "answer_accuracy": 0.25, "format_accuracy": 0.75, "unclosed_rate": 0.125,
           "mean_completion_tokens": 90.5, "rows": 2}

  def sft_run(name, *extra, **summary):
    run = fake_sft_run(tmp_path, name, "tiny-llama", None, data=[*data, f"train.eval_generate={cfg.train.eval_generate}",
                                                               f"train.eval_max_new_tokens={cfg.train.eval_max_new_tokens}",
                                                               *extra])
    (run / "summary.json").write_text(json.dumps({"after": after, "finished": True, "best_step": 9, "last_step": 9,
                                                  **summary}))
    return str(run)

  run = sft_run("alike")
  tasks = grpo.cli.eval_task_prompts(cfg, run, trainer.model)
  assert cfg.train.eval_generate == 2 and len(tasks["sft_rows.jsonl"]) == 3  # 2 of them scored
  known = grpo.cli.init_before(cfg, run, tasks)
  assert known == {"sft_rows.jsonl": {"accuracy": 0.25, "format_accuracy": 0.75, "unclosed_rate": 0.125,
                                      "mean_completion_tokens": 90.5, "rows": 2}}
  for name, extra, summary in [("other length", ["train.eval_max_new_tokens=5"], {}),
                               ("best is not last", [], {"best_step": 4}), ("unfinished", [], {"finished": False}),
                               ("other rows", ["train.eval_generate=3"], {"after": {**after, "rows": 3}})]:
    assert grpo.cli.init_before(cfg, sft_run(name, *extra, **summary), tasks) == {}, name

  generated = []
  monkeypatch.setattr(grpo.Trainer, "evaluate", lambda self, lora, tasks=None: generated.append(list(tasks or {})) or {})
  tr = dataclasses.replace(trainer, tasks={**tasks, "other": []}, known_before=known)
  before, after_scores = tr.held_out(None, full=True, before=True), tr.held_out(None, full=True)
  assert generated == [["other"], ["sft_rows.jsonl", "other"]]  # generated after, never before
  assert before == {f"sft_rows.jsonl/{k}": v for k, v in known["sft_rows.jsonl"].items()} and after_scores == {}


def test_table_has_a_block_per_eval_task(trainer):
  tr = dataclasses.replace(trainer, tasks={"gsm_symbolic": []})
  gsm = lambda acc, fmt: {"gsm_symbolic/accuracy": acc, "gsm_symbolic/format_accuracy": fmt,  # noqa: E731
                          "gsm_symbolic/unclosed_rate": 1 - fmt, "gsm_symbolic/mean_completion_tokens": 90.0,
                          "gsm_symbolic/rows": 112}
  before = {"accuracy": 0.25, "format_accuracy": 0.75, "rows": 128, **gsm(0.0, 0.857)}
  after = {"accuracy": 0.5, "format_accuracy": 1.0, "rows": 128, **gsm(0.0, 0.964)}
  own, task = [b.splitlines() for b in tr.table(before, after).split("\n\n")]
  assert own[0].split() == ["held-out", "(128", "rows)", "before", "after"]
  assert [line.split() for line in own[1:]] == [["accuracy", "0.250", "0.500"], ["format_accuracy", "0.750", "1.000"]]
  assert task[0].split() == ["held-out", "gsm_symbolic", "(112", "rows)", "before", "after"]
  assert [line.split()[0] for line in task[1:]] == grpo.trainer.TASK_METRICS
  assert task[2].split()[1:] == ["0.857", "0.964"]


@pytest.mark.slow
def test_init_merges_the_sft_adapter(tmp_path):
  from tests.conftest import TINY_LLAMA

  cfg = TINY_LLAMA
  params = transformer.init_params(cfg, jax.random.key(0))
  lcfg = config.LoraCfg(rank=16, alpha=32)
  key = jax.random.key(3)
  lora = jax.tree.map(lambda x: 0.1 * jax.random.normal(key, x.shape), lora_lib.init(cfg, lcfg, key))
  run = fake_sft_run(tmp_path, "sft", "tiny-llama", lora)
  merged = runs.apply_init(str(run), params)
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % cfg.vocab_size
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  want = transformer.forward(params, cfg, tokens, pos, lora=lora, lora_scale=lora_lib.scale(lcfg))
  got = transformer.forward(merged, cfg, tokens, pos)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  # a GRPO run on top chains: its base is the merged SFT weights
  grpo_run = tmp_path / "grpo"
  runs.write_info(grpo_run, "grpo", str(run))
  chained = runs.base_params(grpo_run, params)
  for x, y in zip(jax.tree.leaves(chained), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_cli_bad_init_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "tpu_reason.grpo", f"grpo.init={tmp_path / 'nope'}"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "run directory" in lines[0], proc.stderr
