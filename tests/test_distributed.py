"""Tests for tpu_reason.distributed: when to join a multi-process run, which rows each process
holds, and two CPU processes on localhost running the same sharded SFT step as one process.

The multi-process test runs this file as a script (`worker`), in fresh interpreters with 2 fake
CPU devices each: jax.distributed can only be initialised once, before any computation.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import QUICK_XLA
from tpu_reason import distributed, mesh as mesh_lib, sharding as sharding_lib
from tpu_reason.config import MeshCfg
from tpu_reason.errors import UserError

# several processes, each compiling a trainer; run apart from other tests (scripts/test.sh), since gloo's
# rendezvous between the two processes has a fixed 30 s deadline
pytestmark = [pytest.mark.slow, pytest.mark.serial]

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_REASON_DISTRIBUTED", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def clean_env(monkeypatch):
  for name in ENV:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


@pytest.mark.parametrize("env,want", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "explicit"),
    ({"TPU_REASON_DISTRIBUTED": "auto"}, "auto"),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, "auto"),
    ({"TPU_WORKER_HOSTNAMES": "host-0"}, None),  # one host (a Kaggle v5e-8): nothing to join
])
def test_wanted_reads_the_environment(clean_env, env, want):
  for k, v in env.items():
    clean_env.setenv(k, v)
  assert distributed.wanted() == want


def test_single_process_is_a_no_op(clean_env):
  assert distributed.initialize() == (0, 1)
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("count,pid,needle", [("two", "0", "JAX_NUM_PROCESSES must be a non-negative integer"),
                                              ("2", "", "JAX_PROCESS_ID must be a non-negative integer"),
                                              ("2", "2", "JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2")])
def test_bad_process_env_is_a_user_error(clean_env, count, pid, needle):
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  clean_env.setenv("JAX_NUM_PROCESSES", count)
  clean_env.setenv("JAX_PROCESS_ID", pid)
  with pytest.raises(UserError, match=needle):
    distributed.initialize()


def test_one_process_holds_every_row_and_global_batch_matches_device_put():
  m = mesh_lib.make_mesh(MeshCfg(fsdp=4, tp=2))
  x = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  assert distributed.process_rows(sharding_lib.rows_sharding(m, x.shape), x.shape) == slice(0, 8)
  out = distributed.global_batch({"tokens_BxT": x}, m)["tokens_BxT"]
  assert out.sharding == sharding_lib.rows_sharding(m, x.shape)
  assert [s.data.shape for s in out.addressable_shards] == [(2, 3)] * 8
  np.testing.assert_array_equal(np.asarray(out), x)


# --------------------------------------------------------------------------- two processes


def worker(data: str, out: str):
  """One process: join the run (if the env says so), build the tiny trainer, take one step."""
  jax.config.update("jax_num_cpu_devices", 2 if os.environ.get("JAX_COORDINATOR_ADDRESS") else 4)
  from tests.test_sft import make_cfg
  from tpu_reason import lora as lora_lib, sft
  from tpu_reason.data import loader

  pid, count = distributed.initialize()
  tr = sft.build(make_cfg(Path(out), Path(data), "mesh.fsdp=4"))
  lora = lora_lib.init(tr.model.cfg, tr.cfg.lora, jax.random.key(0), tr.dtype)
  lora = jax.tree.map(lambda x: x + 0.01, lora)  # non-zero B: every adapter gets a gradient
  state = jax.device_put(sft.init_state(lora, tr.optimizer, 0), tr.state_sharding)
  batch = next(loader.batches(tr.train, tr.cfg.train.batch_size, seed=0))
  placed = tr.place_batch(batch)
  rows = distributed.process_rows(placed.completion_tokens_BxC.sharding, placed.completion_tokens_BxC.shape)
  state, m = tr.step_fn(state, tr.params, placed)
  l1 = jax.jit(lambda t: sum(jax.numpy.abs(x).sum() for x in jax.tree.leaves(t)))(state.lora)
  print(json.dumps({"pid": pid, "count": count, "devices": jax.device_count(), "local": jax.local_device_count(),
                    "rows": [rows.start, rows.stop], "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                    "lora_l1": float(l1)}))


def grpo_worker(data: str, out: str):
  """One process of a whole GRPO run (2 steps, evals, checkpoints) into `out`, shared by all processes."""
  jax.config.update("jax_num_cpu_devices", 2 if os.environ.get("JAX_COORDINATOR_ADDRESS") else 4)
  from tests.test_grpo import make_cfg
  from tpu_reason import checkpoint, grpo
  from tpu_reason.tree import flatten

  grpo.run(make_cfg(Path(out), Path(data), "mesh.fsdp=4", "grpo.steps=2"))
  lora, _ = checkpoint.restore_lora(checkpoint.find_step(Path(out) / "checkpoints" / "last"))
  print(json.dumps({"pid": jax.process_index(), "devices": jax.device_count(),
                    "lora": {k: [float(np.abs(v).sum()), float(v.sum())] for k, v in flatten(lora).items()}}))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(data, out, mode="sft", **env):
  env = {**{k: v for k, v in os.environ.items() if k not in ENV}, "XLA_FLAGS": QUICK_XLA, "JAX_PLATFORMS": "cpu", **env}
  root = str(Path(__file__).resolve().parent.parent)
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  return subprocess.Popen([sys.executable, __file__, str(data), str(out), mode], env=env, cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc) -> dict:
  try:
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


def _pair(data, outs, mode) -> list[dict]:
  """Both processes' results (process i writes into outs[i]); the one-process run starts after them, not
  beside: gloo's rendezvous deadline is a fixed 30 s, and a third process on 2 cores skews the pair."""
  address = f"127.0.0.1:{_free_port()}"
  procs = [_launch(data, out, mode, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
           for i, out in enumerate(outs)]
  return [_result(p) for p in procs]


def test_two_processes_agree_with_one(tmp_path):
  from tests.test_sft import write_rows

  data = write_rows(tmp_path / "rows.jsonl", 16, 16, 4)
  p0, p1 = _pair(data, [tmp_path / "p0", tmp_path / "p1"], "sft")
  one = _result(_launch(data, tmp_path / "single"))

  assert (p0["pid"], p1["pid"], p0["count"], one["count"]) == (0, 1, 2, 1)
  assert p0["devices"] == p1["devices"] == one["devices"] == 4 and p0["local"] == p1["local"] == 2
  assert (p0["rows"], p1["rows"], one["rows"]) == ([0, 4], [4, 8], [0, 8])  # each process feeds its half
  for key in ("loss", "grad_norm", "lora_l1"):
    assert p0[key] == p1[key], key  # one program, replicated results
    assert p0[key] == pytest.approx(one[key], rel=1e-5), key  # reduction order may differ across processes
  assert np.isfinite(one["loss"]) and one["grad_norm"] > 0


def test_two_process_grpo_agrees_with_one_and_only_process_0_writes(tmp_path):
  from tests.test_sft import write_rows

  data = write_rows(tmp_path / "rows.jsonl", 24, 8, 4)
  p0, p1 = _pair(data, [tmp_path / "pair"] * 2, "grpo")
  one = _result(_launch(data, tmp_path / "single", "grpo"))
  assert (p0["pid"], p1["pid"], p0["devices"], one["devices"]) == (0, 1, 4, 4)
  assert p0["lora"] == p1["lora"]  # both processes restore the one checkpoint
  for name, (l1, total) in one["lora"].items():
    assert p0["lora"][name][0] == pytest.approx(l1, rel=1e-4), name
    assert p0["lora"][name][1] == pytest.approx(total, rel=1e-3, abs=1e-6), name
  assert any(l1 > 0 for l1, _ in one["lora"].values())
  # the run directory is written once: the same files and line counts as the one-process run
  files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*")  # noqa: E731
                              if p.is_file() and "checkpoints" not in p.parts and "tb" not in p.parts)
  assert files(tmp_path / "pair") == files(tmp_path / "single")
  for name in ("metrics.jsonl", "rollouts.jsonl"):
    lines = lambda run: (tmp_path / run / name).read_text().splitlines()  # noqa: E731
    assert len(lines("pair")) == len(lines("single")), name
  assert len((tmp_path / "pair" / "rollouts.jsonl").read_text().splitlines()) == 2
  assert len(list((tmp_path / "pair" / "tb").iterdir())) == 1  # one TensorBoard writer


if __name__ == "__main__":
  (grpo_worker if sys.argv[3:] == ["grpo"] else worker)(*sys.argv[1:3])
