"""Ctrl-C at random moments of a tiny SFT and a tiny GRPO run: each must save, and resume bit for bit.

For each trainer: one uninterrupted reference run, then `--trials` runs that get a SIGINT
at a random moment of training (mid-step, between steps, during a checkpoint write) and are
started again with the same command. A trial passes when the interrupted run exits 130 with
no traceback and the resumed run ends with the reference's exact state (adapters, Adam
moments, step, RNG key) and the same per-step losses.

  python scripts/sigint_resume.py            # 10 SFT + 10 GRPO interrupts, ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

RUNS = {
    "sft": ["model.spec=tiny-llama", "data.size=32", "data.eval_size=0", "train.batch_size=2",
            "train.max_steps=8", "train.save_every=3", "train.optim.warmup_steps=1"],
    "grpo": ["model.spec=tiny-llama", "grpo.init=base", "grpo.steps=6", "grpo.prompts=1", "grpo.group=2",
             "grpo.sampling.max_new_tokens=16", "grpo.save_every=2", "grpo.num_iterations=2", "data.eval_size=0",
             "train.eval_generate=0"],
}

def launch(kind: str, out: pathlib.Path) -> subprocess.Popen:
  """The trainer on `out`, its stderr going to `out`.err (read back by `finish`)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  err = open(f"{out}.err", "w")
  return subprocess.Popen([sys.executable, "-m", f"tpu_reason.{kind}", *RUNS[kind], f"output_dir={out}"],
                          env={**env, "JAX_PLATFORMS": "cpu"}, text=True, stdout=subprocess.DEVNULL, stderr=err)


def finish(proc: subprocess.Popen, out: pathlib.Path) -> str:
  proc.wait(timeout=900)
  return pathlib.Path(f"{out}.err").read_text()


def first_step_time(proc: subprocess.Popen, out: pathlib.Path) -> float:
  """Seconds from launch until the first training step is logged (polled)."""
  t0 = time.monotonic()
  metrics = out / "metrics.jsonl"
  while proc.poll() is None and not (metrics.exists() and '"split": "train"' in metrics.read_text()):
    time.sleep(0.05)
  return time.monotonic() - t0


def final_state(out: pathlib.Path) -> dict:
  last = out / "checkpoints" / "last"
  step = max(int(p.name) for p in last.iterdir() if p.name.isdigit())
  tree = ocp.PyTreeCheckpointer().restore(last / str(step) / "state")
  as_np = lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  return {"step": step, "leaves": [as_np(x) for x in jax.tree.leaves(tree)]}


def train_rows(out: pathlib.Path) -> dict[int, float]:
  rows = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def same(a: dict, b: dict) -> bool:
  return a["step"] == b["step"] and len(a["leaves"]) == len(b["leaves"]) and all(
      x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a["leaves"], b["leaves"]))


def logged_steps(out: pathlib.Path) -> int:
  metrics = out / "metrics.jsonl"
  return metrics.read_text().count('"split": "train"') if metrics.exists() else 0


def trial(kind: str, out: pathlib.Path, steps: int, per_step: float, rng: random.Random) -> tuple[str, str]:
  """(outcome, detail): interrupt one run at a random moment of its training, then resume it.

  The moment: once a random number of steps (0 included) is logged, a random delay of up to two
  steps' time, so the signal lands mid-step, between steps or during a checkpoint write.
  """
  after, delay = rng.randrange(steps), rng.uniform(0, 2 * per_step)
  proc = launch(kind, out)
  while proc.poll() is None and logged_steps(out) < after:
    time.sleep(0.02)
  time.sleep(delay)
  if proc.poll() is not None:
    return "missed", "finished before the signal"
  proc.send_signal(signal.SIGINT)
  err = finish(proc, out)
  if proc.returncode in (0, -signal.SIGINT) and (out / "summary.json").exists():
    # every step ran and was saved: the signal came during the closing summary or the interpreter's exit
    return "missed", f"the run had finished (exit {proc.returncode})"
  if proc.returncode == -signal.SIGINT and not (out / "config.yaml").exists():
    # Ctrl-C while Python was still importing the CLI's modules: Python's own handler prints the
    # KeyboardInterrupt and exits; no run had started, so nothing was there to save
    detail = "interrupted while importing (before the run started)"
  elif proc.returncode != 130 or "Traceback" in err:
    return "FAIL", f"interrupted run exited {proc.returncode}: {err[-1500:]}"
  else:
    said = [ln.strip() for ln in err.replace("\r", "\n").splitlines()]
    quiet = "its last step was already saved" if logged_steps(out) else "interrupted before any step"
    detail = next((ln for ln in said if "saved step" in ln or "last checkpoint" in ln), quiet)
  resumed = launch(kind, out)
  err = finish(resumed, out)
  if resumed.returncode != 0:
    return "FAIL", f"resume exited {resumed.returncode}: {err[-1500:]}"
  return "ok", f"signal {delay:.1f}s after step {after} was logged: {detail}"


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--trials", type=int, default=10, help="interrupts per trainer")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--only", choices=sorted(RUNS), help="one trainer only")
  args = ap.parse_args()
  rng = random.Random(args.seed)
  counts = {}
  with tempfile.TemporaryDirectory() as tmp:
    for kind in [args.only] if args.only else sorted(RUNS, reverse=True):
      ref = pathlib.Path(tmp) / f"{kind}-ref"
      t0 = time.monotonic()
      proc = launch(kind, ref)
      first = first_step_time(proc, ref)
      err = finish(proc, ref)
      assert proc.returncode == 0, err[-3000:]
      wall = time.monotonic() - t0
      want, want_loss = final_state(ref), train_rows(ref)
      per_step = (wall - first) / max(want["step"] - 1, 1)
      print(f"{kind}: reference run {wall:.1f}s, {want['step']} steps, the first logged at {first:.1f}s, "
            f"then {per_step:.1f}s a step", flush=True)
      ok = missed = 0
      for i in itertools.count(1):
        if ok == args.trials or i > 3 * args.trials:
          break
        out = pathlib.Path(tmp) / f"{kind}-{i}"
        outcome, detail = trial(kind, out, want["step"], per_step, rng)
        if outcome == "ok" and not same(final_state(out), want):
          outcome, detail = "FAIL", f"the resumed run's final state differs from the reference ({detail})"
        elif outcome == "ok" and train_rows(out) != want_loss:
          outcome, detail = "FAIL", f"losses differ: {train_rows(out)} vs {want_loss} ({detail})"
        print(f"  {kind} #{i}: {outcome}: {detail}", flush=True)
        if outcome == "FAIL":
          sys.exit(f"{kind}: failed after {ok} good interrupts")
        ok += outcome == "ok"
        missed += outcome == "missed"
      counts[kind] = (ok, ok + missed)
  for kind, (ok, tried) in counts.items():
    print(f"{kind}: {ok} of {ok} interrupts saved and resumed bit-identically ({tried - ok} signals came after the run ended)")
  print(f"total: {sum(ok for ok, _ in counts.values())} SIGINTs, all saved and resumed bit-identically")


if __name__ == "__main__":
  main()
