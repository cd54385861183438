"""Tests for tpu_reason.sft: LoRA-only steps, non-finite skips, exact resume, checkpoint safety,
sharding equivalence, compile counts, run outputs and CLI errors.

Everything runs the `tiny-llama` spec (random 2-layer model, real SmolLM2 tokenizer) on a
small JSONL of one-line arithmetic rows written per module: P=56 prompt tokens and two
completion buckets (32 and 64), batch 8. conftest.py gives the session 8 fake CPU devices,
so `build` puts the default mesh (fsdp=-1) on all 8.

Compiling the train step is the whole cost on a CPU (~10 s per signature on a busy
2-core machine), so the module builds ONE Trainer with the real `sft.build` and the `run`
tests reuse it (`reuse_build` swaps in a copy with the run's own config and output dir,
after checking that everything `build` depends on is identical): every jitted function
then compiles once per module.
"""

import dataclasses
import functools
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from tests.conftest import TINY_LLAMA
from tpu_reason import (checkpoint, config, config_io, loop, lora as lora_lib, mesh as mesh_lib, metrics, sft,
                        sharding as sharding_lib)
from tpu_reason.config import Config, MeshCfg
from tpu_reason.data import loader
from tpu_reason.errors import UserError
from tpu_reason.models.transformer import param_shapes
from tpu_reason.tree import flatten, unflatten


def write_rows(path, n_short, n_long, n_eval):
  """JSONL rows: short completions fit the 32-token bucket, long ones need 64; the
  file's last n_eval rows (short) become the held-out split."""
  rows = []
  for i in range(n_short + n_long + n_eval):
    a, b = i + 2, (i * 7) % 11 + 1
    if n_short <= i < n_short + n_long:
      reasoning = (f"First take {a}. Then add {b} to it, step by step: {a} + {b} = {a + b}. "
                   f"So the total is {a + b}, and that is the answer.")
    else:
      reasoning = f"{a} + {b} = {a + b}."
    rows.append({"id": f"r{i}", "question": f"What is {a} plus {b}?", "reasoning": reasoning, "answer": str(a + b)})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def make_cfg(out, data_path, *overrides) -> Config:
  """16 short + 16 long training rows, 4 held out; 4 steps of 8 rows = one epoch."""
  return config_io.load(Config, None, [
      f"output_dir={out}", "model.spec=tiny-llama", "data.source=jsonl", f"data.path={data_path}",
      "data.size=32", "data.eval_size=4", "data.system_prompt=", "data.max_prompt_tokens=56",
      "data.max_completion_tokens=64", "data.completion_buckets=[32]", "train.batch_size=8",
      "train.max_steps=4", "train.optim.warmup_steps=1", "train.save_every=2", "train.eval_every=2",
      "train.eval_generate=0", "train.eval_max_new_tokens=8", *overrides])


def _build_key(cfg: Config):
  """Everything `build` depends on (the rest only matters inside `run`)."""
  t = dataclasses.replace(cfg.train, eval_generate=0, eval_max_new_tokens=1, max_nonfinite=1, max_minutes=0,
                          save_every=1, eval_every=1, keep_last=1, resume="none")
  return cfg.model, cfg.lora, cfg.mesh, cfg.data, t


def reuse_build(monkeypatch, tr: sft.Trainer, **changes):
  """Make `sft.build(cfg)` return `tr` with cfg / output dir (and `changes`) swapped in."""

  def build(cfg):
    assert _build_key(cfg) == _build_key(tr.cfg), "this run needs its own build()"
    return dataclasses.replace(tr, cfg=cfg, out=cfg.resolved_output_dir(), **changes)

  monkeypatch.setattr(sft, "build", build)


def host(tree):
  """A host (numpy) copy that survives donation of the device buffers."""
  return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def fresh_state(tr: sft.Trainer, lora=None) -> sft.TrainState:
  """The state `run` starts from: `loop.initial_state` with no checkpoint to resume
  (optionally with other adapter values, placed like the fresh ones)."""
  ckpts = checkpoint.Checkpoints(tr.out / "no-checkpoints", keep_last=1)
  try:
    state, meta = loop.initial_state(tr, ckpts)
  finally:
    ckpts.close()
  assert meta == {} and int(state.step) == 0
  if lora is not None:
    lora = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), lora, state.lora)
    state = dataclasses.replace(state, lora=lora)
  return state


def batches_of(tr: sft.Trainer, bucket: int, n: int) -> list:
  out = []
  for b in loader.batches(tr.train, tr.cfg.train.batch_size, seed=0):
    if b.arrays.completion_tokens_BxC.shape[1] == bucket:
      out.append(b)
    if len(out) == n:
      return out


def tree_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


# --------------------------------------------------------------------------- one Trainer, two buckets


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  """A Trainer from the real `sft.build` on all 8 devices with completion buckets 32 and 64."""
  data = write_rows(tmp_path_factory.mktemp("sft_data") / "rows.jsonl", 16, 16, 4)
  tr = sft.build(make_cfg(tmp_path_factory.mktemp("trainer"), data))
  assert tr.mesh.shape == {"fsdp": 8, "tp": 1}
  groups = loader.group_by_bucket(tr.train)
  assert {b: len(g) for b, g in groups.items()} == {32: 16, 64: 16}
  assert len(tr.eval) == 4
  return tr


@pytest.fixture(scope="module")
def compile_history(trainer):
  """Two epochs of real steps from a fresh state: per step (bucket, jit cache size, backend compiles).

  Module-scoped and requested by every test that steps `trainer`, so it is the first to
  call the jitted step.
  """
  tr = trainer
  assert tr.step_fn._cache_size() == 0
  state = fresh_state(tr)
  history = []
  data = loader.batches(tr.train, tr.cfg.train.batch_size, seed=0)
  for _ in range(2 * 4):  # 4 batches per epoch: two per bucket
    batch = next(data)
    with metrics.compiles() as cc:
      state, m = tr.step_fn(state, tr.params, tr.place_batch(batch))
      jax.block_until_ready(m)
    assert bool(m["finite"])
    history.append((batch.arrays.completion_tokens_BxC.shape[1], tr.step_fn._cache_size(), cc.n))
  return history


@pytest.fixture(scope="module")
def first_bucket(compile_history):
  """The bucket of the first step: a fresh state on it hits the step already compiled."""
  return compile_history[0][0]


@pytest.mark.slow
def test_step_cache_stops_growing_once_every_bucket_was_stepped(compile_history):
  history = compile_history
  assert {b for b, _, _ in history[:4]} == {32, 64}
  assert history[0][2] >= 1 and history[0][1] == 1  # the very first step compiles (the counter works)
  # warm once every bucket was stepped with a state that came out of a step
  # (the very first step's state is the fresh one from init_state)
  warm = max(next(i for i, (b, _, _) in enumerate(history) if i > 0 and b == bucket) for bucket in (32, 64))
  later = history[warm + 1:]
  assert {b for b, _, _ in later} == {32, 64}, history
  assert [c for _, _, c in later] == [0] * len(later), history  # no backend compile
  assert {size for _, size, _ in later} == {history[warm][1]}, history  # no new jit cache entry


@pytest.mark.slow
def test_exactly_one_compile_per_completion_bucket(compile_history):
  seen = {b for b, _, _ in compile_history}
  assert sum(c for _, _, c in compile_history) == len(seen)
  assert compile_history[-1][1] == len(seen)


@pytest.mark.slow
def test_train_step_is_lora_only(trainer, first_bucket):
  tr = trainer
  params_before = host(tr.params)
  state = fresh_state(tr)
  lora0 = host(state.lora)
  assert all(np.all(x == 0) for n, x in flatten(lora0).items() if n.endswith("/b"))
  other = 64 if first_bucket == 32 else 32
  for batch in batches_of(tr, first_bucket, 2) + batches_of(tr, other, 1):
    state, m = tr.step_fn(state, tr.params, tr.place_batch(batch))
    assert bool(m["finite"]) and float(m["grad_norm"]) > 0
  assert int(state.step) == 3 and int(state.bad_steps) == 0

  # base weights: bit-identical
  after = flatten(host(tr.params))
  assert after.keys() == flatten(params_before).keys()
  for name, x in flatten(params_before).items():
    assert np.array_equal(after[name], x), name
  # every adapter moved (B from its zero init; A once B was non-zero)
  lora3 = flatten(host(state.lora))
  for name, x in flatten(lora0).items():
    assert not np.array_equal(lora3[name], x), name
    assert np.all(np.isfinite(lora3[name])), name

  # optimizer state: Adam moments with exactly the LoRA tree, nothing shaped like the base
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  lora_tree = jax.tree.structure(state.lora)
  assert jax.tree.structure(adam[0].mu) == lora_tree and jax.tree.structure(adam[0].nu) == lora_tree
  tensors = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sorted(x.shape for x in tensors) == sorted([x.shape for x in jax.tree.leaves(state.lora)] * 2)
  assert sum(x.size for x in tensors) == 2 * lora_lib.count(state.lora)
  assert int(adam[0].count) == 3


@pytest.mark.slow
def test_non_finite_step_is_skipped_and_counted(trainer, first_bucket):
  tr = trainer
  b1, b2 = [tr.place_batch(b) for b in batches_of(tr, first_bucket, 2)]
  # NaN in one base weight, for these calls only (same shape and sharding: no recompile)
  norm = tr.params["final_norm"]
  bad_params = {**tr.params, "final_norm": jax.device_put(norm.at[0].set(jnp.nan), norm.sharding)}

  state, m = tr.step_fn(fresh_state(tr), tr.params, b1)
  assert bool(m["finite"])
  good = host(state)
  state, m = tr.step_fn(state, bad_params, b2)
  assert not bool(m["finite"]) and np.isnan(float(m["loss"]))
  assert int(state.bad_steps) == 1 and int(state.step) == 2
  assert tree_equal(host(state.lora), good.lora)
  assert tree_equal(host(state.opt_state), good.opt_state)
  state, m = tr.step_fn(state, bad_params, b2)
  assert not bool(m["finite"])
  assert int(state.bad_steps) == 2 and int(state.step) == 3
  assert tree_equal(host(state.lora), good.lora)

  state, m = tr.step_fn(state, tr.params, b2)
  assert bool(m["finite"])
  assert int(state.bad_steps) == 0 and int(state.step) == 4
  assert not tree_equal(host(state.lora), good.lora)
  # the skips were true no-ops: the same adapters and moments as [b1, b2] without them
  ref, _ = tr.step_fn(fresh_state(tr), tr.params, b1)
  ref, _ = tr.step_fn(ref, tr.params, b2)
  assert tree_equal(host(state.lora), host(ref.lora))
  assert tree_equal(host(state.opt_state), host(ref.opt_state))


@pytest.mark.slow
def test_sharded_steps_agree(trainer, first_bucket):
  """One step on meshes (8,1), (2,4) and (1,1): same loss, grad norm and updated adapters."""
  tr = trainer
  cfg, lcfg = tr.model.cfg, tr.cfg.lora
  host_params = host(tr.params)
  rng = np.random.default_rng(1)
  # non-zero B, so the A gradients are non-trivial too
  lora0 = unflatten({n: (0.02 * rng.standard_normal(x.shape)).astype(np.float32) if n.endswith("/b") else x
                     for n, x in flatten(host(lora_lib.init(cfg, lcfg, jax.random.key(0)))).items()})
  batch = sft.device_batch(batches_of(tr, first_bucket, 1)[0])
  # (8, 1) is the trainer's own mesh and jitted step; the others compile their own
  step = jax.jit(functools.partial(sft._train_step, cfg=cfg, optimizer=tr.optimizer, lora_scale=tr.lora_scale,
                                   dtype=tr.dtype, remat=tr.cfg.model.remat, chunk=tr.cfg.model.vocab_chunk,
                                   accum=tr.cfg.train.grad_accum))
  results = {}
  for fsdp, tp in [(8, 1), (2, 4), (1, 1)]:
    mesh = mesh_lib.make_mesh(MeshCfg(fsdp=fsdp, tp=tp), jax.devices()[: fsdp * tp])
    params = sharding_lib.place(host_params, sharding_lib.shardings(param_shapes(cfg), mesh))
    lora = sharding_lib.place(lora0, sharding_lib.shardings(lora_lib.shapes(cfg, lcfg), mesh))
    placed = jax.tree.map(lambda v: jax.device_put(v, sharding_lib.rows_sharding(mesh, v.shape)), batch)
    if (fsdp, tp) == (2, 4):  # really sharded: vocab over tp, model dim over fsdp, batch over fsdp
      assert params["embed"].sharding.spec == PartitionSpec("tp", "fsdp")
      assert placed.completion_tokens_BxC.addressable_shards[0].data.shape[0] == 4
    if (fsdp, tp) == (8, 1):
      new, m = tr.step_fn(fresh_state(tr, lora0), tr.params, placed)
    else:
      new, m = step(sft.init_state(lora, tr.optimizer, 0), params, placed)
    assert bool(m["finite"])
    results[(fsdp, tp)] = (float(m["loss"]), float(m["grad_norm"]), host(new.lora))

  loss, gnorm, upd = results[(1, 1)]
  assert gnorm > 0
  for mesh_shape in [(8, 1), (2, 4)]:
    l, g, u = results[mesh_shape]
    assert l == pytest.approx(loss, rel=1e-5), mesh_shape
    assert g == pytest.approx(gnorm, rel=1e-5), mesh_shape
    # Adam's first update is lr * g / (|g| + eps): an entry whose gradient is within a few eps of zero turns
    # reduction-order noise into a visible change (up to 2 lr on a sign flip). Every entry agrees to 1% of lr
    # but at most 1 in 1000 of them, and those by no more than a sign flip.
    lr = tr.cfg.train.optim.lr
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(upd))])
    assert (diff > 1e-2 * lr).mean() <= 1e-3 and diff.max() <= 2 * lr * (1 + 1e-3), (mesh_shape, diff.max())


# --------------------------------------------------------------------------- run(): outputs, resume


def interrupt_training_after(monkeypatch, n_steps):
  """Raise KeyboardInterrupt when `run` asks for its (n_steps+1)-th training batch."""
  real = loader.batches

  def batches(examples, batch_size, **kw):
    it = real(examples, batch_size, **kw)
    if kw.get("shuffle", True) is False:  # eval batches
      return it

    def limited():
      for i, batch in enumerate(it):
        if i == n_steps:
          raise KeyboardInterrupt
        yield batch

    return limited()

  monkeypatch.setattr(loader, "batches", batches)


def read_metrics(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def restore_last(tr: sft.Trainer, cfg: Config, out, step: int):
  """(state, meta) of checkpoints/last/<step>, restored into a fresh single-device state."""
  abstract = sft.init_state(lora_lib.init(tr.model.cfg, cfg.lora, jax.random.key(0)),
                            sft.make_optimizer(cfg.train.optim, cfg.train.max_steps), 0)
  ckpts = checkpoint.Checkpoints(out / "checkpoints", cfg.train.keep_last)
  try:
    assert step in ckpts.last.all_steps()
    return ckpts.restore(step, abstract)
  finally:
    ckpts.close()


@pytest.fixture(scope="module")
def straight_run(trainer, compile_history, tmp_path_factory):
  """4 steps in one go (eval + save at 2 and 4; two held-out prompts generated before and after)."""
  out = tmp_path_factory.mktemp("straight") / "run"
  cfg = dataclasses.replace(trainer.cfg, output_dir=str(out),
                            train=dataclasses.replace(trainer.cfg.train, eval_generate=2))
  with pytest.MonkeyPatch.context() as mp:
    reuse_build(mp, trainer)
    summary = sft.run(cfg)
  return cfg, out, summary


@pytest.mark.slow
def test_run_writes_all_outputs(trainer, straight_run):
  cfg, out, summary = straight_run
  assert config_io.load(Config, out / "config.yaml") == cfg

  rows = read_metrics(out)
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  lr_at = sft.schedule(cfg.train.optim, cfg.train.max_steps)
  peak = mesh_lib.peak_flops(cfg.mesh) * jax.device_count()  # by the device kind: cpu
  for r in train:
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu"):
      assert key in r and np.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["skipped"] == 0
    assert r["lr"] == pytest.approx(float(lr_at(r["step"] - 1)))
    tokens = r["tokens_per_s"] * r["step_time_s"]  # real prompt + completion tokens of the batch
    assert tokens == pytest.approx(round(tokens), abs=1e-3) and 8 * 20 <= round(tokens) <= 8 * (56 + 64)
    assert r["mfu"] == pytest.approx(6 * trainer.model.cfg.num_params * r["tokens_per_s"] / peak, rel=1e-6)
  # the run compiles its step once per bucket (its first step of that bucket), then nothing
  widths = [b.arrays.completion_tokens_BxC.shape[1] for b, _ in zip(loader.batches(trainer.train, 8, seed=0), range(4))]
  first_of_width = [w not in widths[:i] for i, w in enumerate(widths)]
  assert [r["compiles"] > 0 for r in train] == first_of_width, ([r["compiles"] for r in train], widths)
  evals = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in evals if "format_accuracy" in r] == [0, 4]  # generated before and after
  assert sorted({r["step"] for r in evals}) == [0, 2, 4]

  assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
  assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert summary["plot"] == str(out / "loss.png")

  ckpts = checkpoint.Checkpoints(out / "checkpoints", cfg.train.keep_last, best_metric="eval_loss")
  try:
    assert ckpts.last.all_steps() == [2, 4]
    eval_at = {r["step"]: r["eval_loss"] for r in evals if r["step"] in (2, 4)}
    assert ckpts.best.all_steps() == [min(eval_at, key=eval_at.get)] == [summary["best_step"]]
  finally:
    ckpts.close()

  assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert summary["last_step"] == 4 and summary["output_dir"] == str(out)
  for when in ("before", "after"):
    for key in ("eval_loss", "format_accuracy", "answer_accuracy", "mean_completion_tokens"):
      assert key in summary[when], (when, key)
    assert 0 < summary[when]["mean_completion_tokens"] <= cfg.train.eval_max_new_tokens
  assert summary["before"]["eval_loss"] == pytest.approx(evals[0]["eval_loss"])
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]  # 4 steps do learn something


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(trainer, straight_run, tmp_path, monkeypatch, capsys):
  cfg_a, out_a, _ = straight_run
  out = tmp_path / "run"
  # The same schedule (max_steps=4) in both halves; the first half is interrupted after
  # 3 steps, i.e. after the step-2 checkpoint, so the crash handler must save step 3.
  cfg = dataclasses.replace(trainer.cfg, output_dir=str(out))
  reuse_build(monkeypatch, trainer)
  with pytest.MonkeyPatch.context() as mp:
    interrupt_training_after(mp, 3)
    with pytest.raises(KeyboardInterrupt):
      sft.run(cfg)
  assert "saved step 3" in capsys.readouterr().err
  state3, meta3 = restore_last(trainer, cfg, out, 3)
  assert int(state3.step) == 3 and meta3["data_position"] == 3

  summary = sft.run(cfg)  # train.resume=latest
  assert "resumed from" in capsys.readouterr().out
  assert summary["last_step"] == 4

  rows, rows_a = read_metrics(out), read_metrics(out_a)
  loss = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  assert loss == {r["step"]: r["loss"] for r in rows_a if r["split"] == "train"}  # incl. the resumed step 4
  assert [r["step"] for r in rows if r["split"] == "eval" and r["step"] == 0] == [0]  # "before" measured once
  assert summary["before"] == json.loads((out / "before.json").read_text())

  # CPU determinism: the resumed run ends bit for bit where the uninterrupted one did
  # (same programs, same data order, the whole state restored exactly)
  state_a, meta_a = restore_last(trainer, cfg_a, out_a, 4)
  state_b, meta_b = restore_last(trainer, cfg, out, 4)
  assert int(state_b.step) == 4 and int(state_b.bad_steps) == 0
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  for x, y in zip(jax.tree.leaves(host(state_a)), jax.tree.leaves(host(state_b))):
    np.testing.assert_array_equal(x, y)
  assert meta_a["data_position"] == meta_b["data_position"] == 4


@pytest.mark.slow
def test_run_stops_after_max_nonfinite_steps_on_its_last_checkpoint(trainer, compile_history, tmp_path, monkeypatch):
  out = tmp_path / "run"
  cfg = dataclasses.replace(trainer.cfg, output_dir=str(out),
                            train=dataclasses.replace(trainer.cfg.train, max_nonfinite=3))
  # a NaN in one base weight makes every loss NaN (same shapes and shardings: no recompile)
  norm = trainer.params["final_norm"]
  bad = {**trainer.params, "final_norm": jax.device_put(norm.at[0].set(jnp.nan), norm.sharding)}
  reuse_build(monkeypatch, trainer, params=bad)
  with pytest.raises(UserError, match=r"^3 non-finite steps in a row at step 3: lower train.optim.lr or check the "
                                      r"data; the run resumes from its last checkpoint, step 2 \(train.resume=none"):
    sft.run(cfg)
  train = [r for r in read_metrics(out) if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert [r["skipped"] for r in train] == [1, 1, 1] and all(np.isnan(r["loss"]) for r in train)
  # the diverged stop is not saved: step 2 (save_every=2, adapters untouched: B still exactly zero) is the resume point
  ckpts = checkpoint.Checkpoints(out / "checkpoints", cfg.train.keep_last)
  assert ckpts.last.all_steps() == [2]
  ckpts.close()
  state, _ = restore_last(trainer, cfg, out, 2)
  assert int(state.step) == 2
  assert all(np.all(np.asarray(x) == 0) for n, x in flatten(state.lora).items() if n.endswith("/b"))


@pytest.mark.slow
def test_session_budget_stops_with_a_checkpoint_and_resumes(trainer, straight_run, tmp_path, monkeypatch, capsys):
  _, out_a, _ = straight_run
  out = tmp_path / "run"
  cfg = dataclasses.replace(trainer.cfg, output_dir=str(out))
  reuse_build(monkeypatch, trainer)
  summary = sft.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_minutes=1e-6)))
  assert "train.max_minutes=1e-06 spent" in capsys.readouterr().err
  assert not summary["finished"] and summary["last_step"] == 1 and summary["after"] == {}
  state1, _ = restore_last(trainer, cfg, out, 1)
  assert int(state1.step) == 1

  summary = sft.run(cfg)  # the same command without the budget: resumes at step 1
  assert summary["finished"] and summary["last_step"] == 4
  loss = lambda path: {r["step"]: r["loss"] for r in read_metrics(path) if r["split"] == "train"}  # noqa: E731
  assert loss(out) == loss(out_a)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_ctrl_c_during_a_step_finishes_and_saves_it(trainer, tmp_path, monkeypatch, capsys, signum):
  """A real SIGINT (or SIGTERM) while step 1 is dispatched: the step completes, is saved, then the run stops."""
  real = trainer.step_fn
  calls = []

  def signalled(state, params, batch):
    calls.append(1)
    os.kill(os.getpid(), signum)
    return real(state, params, batch)

  reuse_build(monkeypatch, trainer, step_fn=signalled)
  out = tmp_path / "run"
  cfg = dataclasses.replace(trainer.cfg, output_dir=str(out))
  with pytest.raises(KeyboardInterrupt):
    sft.run(cfg)
  err = capsys.readouterr().err
  assert "finishing this step" in err and "saved step 1" in err
  state, _ = restore_last(trainer, cfg, out, 1)
  assert int(state.step) == 1 and len(calls) == 1


@pytest.mark.slow
def test_ctrl_c_while_a_step_holds_the_donated_state_exits_cleanly(trainer, tmp_path, monkeypatch, capsys):
  """An interrupt after a step consumed its (donated) input state: no 'Array has been deleted' crash."""
  real = trainer.step_fn

  def interrupted(state, params, batch):
    real(state, params, batch)  # donates `state`: its buffers are gone
    raise KeyboardInterrupt

  reuse_build(monkeypatch, trainer, step_fn=interrupted)
  with pytest.raises(KeyboardInterrupt):
    sft.run(dataclasses.replace(trainer.cfg, output_dir=str(tmp_path / "run")))
  assert "the interrupted step had already taken the adapters; the last checkpoint is step 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoint safety


def small_state(value: float) -> sft.TrainState:
  lora = lora_lib.init(TINY_LLAMA, config.LoraCfg(rank=2, targets="q"), jax.random.key(0))
  lora = jax.tree.map(lambda x: x + value, lora)
  state = sft.init_state(lora, sft.make_optimizer(config.OptimCfg(), 40), 0)
  return dataclasses.replace(state, step=jnp.array(int(value), jnp.int32))


def test_failed_save_leaves_previous_checkpoint_usable(tmp_path):
  ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints", keep_last=2)
  s2 = small_state(2.0)
  ckpts.save(2, s2, {"step": 2})
  before = set(threading.enumerate())
  # The step-4 save dies half way: Orbax starts writing the arrays into a temporary
  # directory, then the JSON sidecar cannot be serialised.
  with pytest.raises(TypeError):
    ckpts.save(4, small_state(4.0), {"step": 4, "unserialisable": object()})
  for t in set(threading.enumerate()) - before:  # let the orphaned array writer finish
    while True:
      try:
        t.join(timeout=60)
        break
      except RuntimeError:  # started but not yet running (threading's "limbo"): it cannot be joined yet
        time.sleep(0.01)
  ckpts.close()
  names = [p.name for p in (tmp_path / "checkpoints" / "last").iterdir()]
  assert "4" not in names and any(n.startswith("4.") for n in names), names  # a half-written step 4

  again = checkpoint.Checkpoints(tmp_path / "checkpoints", keep_last=2)
  try:
    assert again.latest_step() == 2 and again.last.all_steps() == [2]
    restored, meta = again.restore(2, small_state(0.0))
    assert meta == {"step": 2}
    assert tree_equal(host(restored), host(s2))
    # resuming from 2 and saving step 4 again replaces the half-written directory
    s4 = small_state(4.0)
    again.save(4, s4, {"step": 4})
    assert again.last.all_steps() == [2, 4]
    restored, meta = again.restore(4, small_state(0.0))
    assert meta == {"step": 4} and tree_equal(host(restored), host(s4))
  finally:
    again.close()
