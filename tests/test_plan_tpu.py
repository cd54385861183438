"""`plan --tpu`: libtpu's compiler builds every program of a run for compile-only v5e chips.

libtpu runs in a fresh process per test (ALLOW_MULTIPLE_LIBTPU_LOAD lets several compile at
once), so this session's jax keeps its 8 fake CPU devices and never loads the TPU plugin.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tpu_reason import plan
from tpu_reason.errors import UserError

pytestmark = pytest.mark.slow  # the TPU compiler on real shapes

# the recipe's mesh, batches, LoRA and sampling at short sequences: the compiler's time grows with them
SHORT = ("data.max_prompt_tokens=32", "data.max_completion_tokens=32", "data.completion_buckets=[32]",
         "grpo.sampling.max_new_tokens=32")
PROGRAMS = ("SFT step", "GRPO merge", "GRPO prefill", "GRPO decode", "GRPO log-probs", "GRPO update")
DECODE_LAYOUT = ("GRPO prefill", "GRPO decode")  # on the merged decode copy: whole over fsdp, no weight gathers
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='needs the TPU compiler: pip install "tpu_reason[tpu]" (or the test extra)')
slow = pytest.mark.skipif(os.environ.get("TPU_REASON_SLOW") != "1",
                          reason="real Gemma-3-1B shapes take minutes per program on 2 cores: set TPU_REASON_SLOW=1")


def _plan(*args, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "tpu_reason.plan", "--config", "gemma3-1b-it-v5e8.yaml", *args],
                        capture_output=True, text=True, timeout=3600,
                        env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", **env})


def tpu_rows(stdout: str, head: str = plan.TPU_HEAD) -> dict[str, str]:
  """The line of each program in the TPU table (or the time table, `head=plan.TIME_HEAD`), without its name."""
  table = stdout.split(head, 1)[1].split("\n\n", 1)[0].splitlines()  # the time table follows a blank line
  return {line[:16].rstrip(): line[16:] for line in table if line[:16].rstrip() in PROGRAMS}


def figures(row: str) -> tuple[dict[str, float], str, int, str]:
  """(GiB by column, the plan's cell, all-gathers, verdict) of a compiled program's row."""
  args, outs, temps, total, planned, gathers, verdict = row.split()[:7]
  gib = {"arguments": float(args), "outputs": float(outs), "temporaries": float(temps), "total": float(total)}
  return gib, planned, int(gathers), verdict


@needs_libtpu
def test_stand_in_compiles_every_program_and_fits():
  proc = _plan("--tpu", "v5e-8", "--stand-in", *SHORT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = tpu_rows(proc.stdout)
  assert tuple(rows) == PROGRAMS
  got = {name: figures(row) for name, row in rows.items()}
  for name, (gib, planned, gathers, verdict) in got.items():
    assert gib["arguments"] > 0 and gib["total"] > 0, (name, rows[name])
    assert abs(gib["arguments"] + gib["outputs"] + gib["temporaries"] - gib["total"]) <= 0.002, rows[name]
    assert (planned == "-") == (name == "GRPO log-probs") and (planned == "-" or float(planned) > 0), rows[name]
    if name not in DECODE_LAYOUT:  # fsdp=4: the training layout's programs gather sharded weights (the merge once)
      assert gathers > 0, rows[name]
    assert verdict == "FIT", rows[name]
  # beside each program, the analytical total of the phase it belongs to (columns SFT, rollout, train)
  totals = next(ln for ln in proc.stdout.splitlines() if ln.startswith("total ")).split()[1:]
  assert [got[n][1] for n in ("SFT step", "GRPO merge", "GRPO prefill", "GRPO decode", "GRPO update")] == [
      totals[0], totals[1], totals[1], totals[1], totals[2]]
  assert proc.stdout.rstrip().splitlines()[-1].startswith("TPU v5e-8: FIT, peak ")
  assert "tiny gemma3 stand-in, 15.75 GiB usable per chip" in proc.stdout
  # time on paper: every program's loop-weighted counts; the layer scan makes them exceed XLA's own (body once)
  times = {name: [float(x) for x in row.split()] for name, row in tpu_rows(proc.stdout, plan.TIME_HEAD).items()}
  assert tuple(times) == PROGRAMS
  for name, (gflop, xla_gflop, hbm_gb, coll_mb, compute, hbm, ici, roofline) in times.items():
    # the merge is one rank-r product per projection (a stand-in's rounds to 0.0) and its adds, which XLA counts
    assert name == "GRPO merge" or gflop >= xla_gflop > 0, (name, times[name])
    assert coll_mb > 0 or name in DECODE_LAYOUT, (name, times[name])
    assert roofline == pytest.approx(max(compute, hbm) + ici, abs=0.015), (name, times[name])
  assert times["SFT step"][0] > 2 * times["SFT step"][1] and times["GRPO decode"][0] > 2 * times["GRPO decode"][1]
  per_token = re.search(r"GRPO decode, per generated token per chip: collectives [\d,.]+ MB \(all-gather (\d+\.\d)",
                        proc.stdout)
  # the training layout would all-gather at least the stand-in's tied head each token (vocabulary 262,144 x 64
  # bf16, half a chip's over tp: 16.8 MB); the merged decode copy is whole over fsdp: nothing
  assert per_token and float(per_token.group(1)) <= 0.05 * 262144 * 64 * 2 / 2 / 1e6, per_token.group(0)
  assert re.search(r"^estimated SFT step: [\d.]+ s \(1024 tokens\), MFU [\d.]+%", proc.stdout, re.M)
  assert re.search(r"^estimated GRPO step: [\d.]+ s = merge 1 x .* log-probs 16 x .* update 2 x ", proc.stdout,
                   re.M)  # beta > 0, mu = 2


@needs_libtpu
def test_compiler_refusal_is_no_fit_with_its_buffer_list(tmp_path):
  """Held to 4 MiB a chip, the compiler refuses: one reason per program, exit 1, no traceback."""
  proc = _plan("--tpu", "v5e-8", "--stand-in", "--hbm-gib", "0.004", *SHORT, TPU_LOG_DIR=str(tmp_path))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  table = proc.stdout.split(plan.TPU_HEAD, 1)[1]
  refusals = re.findall(r"^(.{16})  NO FIT: (Ran out of memory.*) \(\d+ s\)$", table, re.M)
  # the merged decode copy does not fit either: the rollout is planned (and compiled) on the training layout
  assert "the merged decode copy" in proc.stdout and "does not fit" in proc.stdout
  programs = [p for p in PROGRAMS if p != "GRPO merge"]
  assert [name.strip() for name, _ in refusals] == programs, table
  assert all("4.00M" in reason for _, reason in refusals), refusals  # the limit the compiler was held to
  logs = re.findall(r"libtpu's buffer list: (\S+)", table)
  assert len(logs) == len(programs) and Path(logs[0]).parent == tmp_path, logs
  log = Path(logs[-1]).read_text(errors="replace")
  assert log.count("Ran out of memory") >= len(programs) and "cumulative_size" in log  # the buffers, by size
  assert proc.stdout.rstrip().splitlines()[-1].startswith("TPU v5e-8: NO FIT: SFT step; GRPO prefill")


def test_bad_tpu_name_is_one_error_line():
  proc = _plan("--tpu", "v5e-16")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: --tpu must be one of v5e-1, v5e-4, v5e-8, got 'v5e-16'"]
  proc = _plan("--tpu", "v5e-8", "--devices", "8")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: --devices (fake CPU devices) and --tpu (the TPU compiler) are exclusive"]


@needs_libtpu
@pytest.mark.serial  # no other test may take or release libtpu's lock while this one holds it
def test_libtpu_held_by_another_process_is_a_one_line_error():
  env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
  # holds libtpu until stdin closes (if another jax program already does, that one holds it)
  hold = ("import contextlib, sys; from tpu_reason import errors, plan\n"
          "with contextlib.suppress(errors.UserError): plan.tpu_devices('v5e-8')\n"
          "print('held', flush=True); sys.stdin.read()")
  holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
  try:
    assert holder.stdout.readline().strip() == "held"
    proc = subprocess.run([sys.executable, "-m", "tpu_reason.plan", "--tpu", "v5e-8"], capture_output=True,
                          text=True, timeout=600, env=env)
  finally:
    holder.communicate("", timeout=60)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1:] == [
      "error: --tpu: another process holds libtpu (/tmp/libtpu_lockfile; any running jax program takes it): wait "
      "for it to end, or run with ALLOW_MULTIPLE_LIBTPU_LOAD=1"]


def test_without_libtpu_the_error_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # what a failed import leaves: find_spec sees no libtpu
  with pytest.raises(UserError, match=r'^--tpu needs the TPU compiler \(libtpu\): pip install "tpu_reason\[tpu\]"$'):
    plan.tpu_devices("v5e-8")


def test_refusal_reason_is_the_compilers_first_line():
  # both forms libtpu 0.0.42.1 raised in `test_compiler_refusal_is_no_fit_with_its_buffer_list`
  scheduled = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in "
               "memory space hbm. Used 9.06M of 8.00M hbm. Exceeded hbm capacity by 1.06M.\n\nTotal hbm usage >= "
               "267.06M:\n    reserved        258.00M \n")
  assert plan.refusal(scheduled) == ("Ran out of memory in memory space hbm. Used 9.06M of 8.00M hbm. "
                                     "Exceeded hbm capacity by 1.06M.")
  early = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (7.88M) "
           "exceeds available HBM (4.00M).")
  assert plan.refusal(early) == early.removeprefix("RESOURCE_EXHAUSTED: ")
  assert plan.refusal("RESOURCE_EXHAUSTED: something else\nmore") == "RESOURCE_EXHAUSTED: something else"


def test_all_gathers_count_sync_ops_and_async_starts():
  hlo = """
  %all-gather-start.1 = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %p0), dimensions={0}
  %all-gather-done.1 = bf16[16,8]{1,0} all-gather-done((bf16[4,8]{1,0}, bf16[16,8]{1,0}) %all-gather-start.1)
  %all-gather.2 = f32[16]{0} all-gather(f32[4]{0} %p1), dimensions={0}
  %all-reduce.3 = f32[] all-reduce(f32[] %p2), to_apply=%add
  """
  assert plan.all_gathers(hlo) == 2


@needs_libtpu
@slow
def test_real_gemma3_1b_fits_a_v5e_8_without_remat():
  """The recipe's real shapes without remat: the compiler refused the SFT step (20.27 GiB of temporaries)
  while every chip computed the whole batch; with each chip's own rows it fits. And the real decode loop
  gathers no weights per token (1,028.5 MB a token a chip on the training layout). The other programs'
  fit on this recipe is `plan --tpu`'s own run (docs/tpu.md); here only these two compile (~70 of ~190 s)."""
  proc = _plan("--tpu", "v5e-8", "--programs", "sft,decode", "model.remat=false")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  got = {name: figures(row) for name, row in tpu_rows(proc.stdout).items()}
  assert tuple(got) == ("SFT step", "GRPO decode") and all(verdict == "FIT" for *_, verdict in got.values())
  assert got["SFT step"][0]["total"] < 12.0  # 8.46 GiB measured with libtpu 0.0.42.1
  # every program takes the base weights: 1B bf16 params over 8 chips is at least 0.23 GiB a chip
  assert all(gib["arguments"] >= 0.23 for gib, *_ in got.values()), got
  per_token = re.search(r"GRPO decode, per generated token per chip: collectives [\d,.]+ MB \(.*all-gather ([\d.]+)",
                        proc.stdout)
  assert per_token and float(per_token.group(1)) <= 0.05 * 1028.5, proc.stdout[-3000:]
  assert re.search(r"^estimated SFT step: [\d.]+ s", proc.stdout, re.M)
  assert "estimated GRPO step" not in proc.stdout  # its other programs were not compiled


def test_programs_are_named_by_one_word_each():
  assert plan.chosen_programs(None) is None
  assert plan.chosen_programs("decode, sft") == ("GRPO decode", "SFT step")
  assert plan.chosen_programs("sft,") == ("SFT step",)
  for bad in ("nope", "sft,logprobs", ","):
    with pytest.raises(UserError, match=r"^--programs takes a comma-separated list of sft, merge, prefill, decode, "
                                        r"log-probs, update, got "):
      plan.chosen_programs(bad)