"""Ours against Hugging Face peers (TRL / transformers / PEFT on CPU torch) at the same shapes.

For each shape and round, ours and theirs run one after the other, each in its own subprocess
(ours: /work/main/.venv's python; theirs: benchmarks/peers/.venv's, from setup.sh), the order
alternating per round (ours first in odd rounds, theirs first in even ones). Each side prints its
figures and one `RESULT {json}` line (benchmarks/_sides.py); the end is a markdown table of both
sides with theirs_s / ours_s (> 1: ours is faster) beside each shape, also written to
benchmarks/peers/last_run.md.

  sft         4 rows x 768 tokens (256 prompt + 512 completion), loss on the completion, median of 3 steps
  sft_ckpt    the same with checkpointing on both sides (TRL gradient checkpointing, ours model.remat=full)
  generate16  4 prompts x G=4 x 512 new tokens (16 rows), temperature 1 / top-k 50, no early stop
  generate4   1 prompt x G=4 x 512 new tokens
  grpo1x4     1 prompt x G=4 x 512 new tokens, beta 0.04, median of 2 steps
  grpo1x4_ckpt  the same with checkpointing on both sides (TRL gradient checkpointing, ours model.remat=full)
  grpo4x4     4 prompts x G=4 x 512 new tokens, beta 0.04, 1 timed step
--small shrinks them all for a smoke run (64 new / 64 + 128 SFT tokens, 1 timed step).
TRL's GRPO runs with gradient checkpointing (TRL's default; --theirs-no-grad-ckpt turns it off): without
it the 4x4x512 step needs ~30 GiB (peak RSS 6.7 GiB at 4x4x64, 10.0 at 4x4x128; 6.1 with it, and the step
was no slower: 46.7 s with, 48.9 s without, at 4x4x128). Our GRPO side and `sft` run without it.

Usage: python benchmarks/peers/compare.py [--rounds 1] [--only sft,generate16,...] [--small]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
OURS_PY = REPO / ".venv" / "bin" / "python"
PEERS_PY = HERE / ".venv" / "bin" / "python"
MODEL_DIR = HERE / ".venv" / "smollm2-135m-hf"
RESULT = "RESULT "  # _sides.RESULT; not imported: this driver stays stdlib-only
NO_MEMORY = 3  # _sides.NO_MEMORY: a side that refused a step it has no memory for


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  kind: str  # sft | generate | grpo
  steps: int  # timed steps (generate: timed calls)
  batch: int = 0
  prompt: int = 0
  completion: int = 0
  prompts: int = 0
  group: int = 0
  new: int = 0
  beta: float = 0.04
  ckpt: bool = False  # checkpointing on both sides (sft; grpo: ours too, TRL's is on by default)

  def describe(self) -> str:
    if self.kind == "sft":
      ckpt = ", checkpointing both sides" if self.ckpt else ""
      return (f"{self.batch} rows x {self.prompt + self.completion} tokens ({self.prompt} + {self.completion})"
              f"{ckpt}, median of {self.steps}")
    rows = f"{self.prompts} prompt{'s' if self.prompts > 1 else ''} x G={self.group} x {self.new} new"
    if self.kind == "generate":
      return f"{rows} ({self.prompts * self.group} rows), median of {self.steps}"
    ckpt = ", checkpointing both sides" if self.ckpt else ""
    return f"{rows}, beta {self.beta}{ckpt}, median of {self.steps}"


WORK = {"sft": "SFT step: TRL SFTTrainer+PEFT vs ours", "generate": "decode: HF generate vs ours",
        "grpo": "GRPO step: TRL GRPOTrainer+PEFT vs ours"}


def shapes(small: bool) -> dict[str, Shape]:
  new, steps = (64, 1) if small else (512, 2)
  sft = Shape("sft", "sft", 1, batch=4, prompt=64, completion=128) if small else \
      Shape("sft", "sft", 3, batch=4, prompt=256, completion=512)
  return {"sft": sft, "sft_ckpt": dataclasses.replace(sft, name="sft_ckpt", ckpt=True),
          "generate16": Shape("generate16", "generate", 1, prompts=4, group=4, new=new),
          "generate4": Shape("generate4", "generate", 1, prompts=1, group=4, new=new),
          "grpo1x4": Shape("grpo1x4", "grpo", steps, prompts=1, group=4, new=new),
          "grpo1x4_ckpt": Shape("grpo1x4_ckpt", "grpo", steps, prompts=1, group=4, new=new, ckpt=True),
          # one timed step: the 16-row step takes TRL ~4 min (warm-up step included, 8 min a side)
          "grpo4x4": Shape("grpo4x4", "grpo", 1, prompts=4, group=4, new=new)}


# --------------------------------------------------------------------------- commands


def command(side: str, s: Shape, grpo_ckpt: bool = True) -> list[str]:
  """The side's command line for this shape (ours: the repo's benchmark scripts with --only ours)."""
  if s.kind == "sft":
    flags = ["--batch", s.batch, "--prompt", s.prompt, "--completion", s.completion, "--steps", s.steps]
    if s.ckpt:
      flags += ["--remat"] if side == "ours" else ["--grad-ckpt"]
    script = (BENCH / "sft_throughput.py", "--only", "ours") if side == "ours" else (HERE / "trl_sft.py",)
  elif s.kind == "generate":
    flags = ["--prompts", s.prompts, "--group", s.group, "--new", s.new, "--reps", s.steps]
    script = (BENCH / "bench_generate.py",) if side == "ours" else (HERE / "hf_generate.py",)
  else:
    flags = ["--prompts", s.prompts, "--group", s.group, "--steps", s.steps, "--beta", s.beta]
    if side == "ours":
      flags += ["--new-tokens", s.new, *(["--remat", "full"] if s.ckpt else [])]
      script = (BENCH / "grpo_throughput.py", "--only", "ours")
    else:
      flags += ["--new", s.new, *(["--grad-ckpt"] if grpo_ckpt else [])]
      script = (HERE / "trl_grpo.py",)
  py = OURS_PY if side == "ours" else PEERS_PY
  return [str(x) for x in (py, *script, *flags)]


def busy_cpu_s() -> float:
  """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
  with open("/proc/stat") as f:
    ticks = [int(x) for x in f.readline().split()[1:]]
  return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


class OthersLoad:
  """The CPU that processes other than the side used while it ran, in cores: a shared machine slows
  both sides, torch's spinning worker threads far more than XLA's, so each figure carries it."""

  def __enter__(self):
    self.t, self.busy, self.child = time.perf_counter(), busy_cpu_s(), children_cpu_s()
    return self

  def __exit__(self, *exc):
    wall = time.perf_counter() - self.t
    others = (busy_cpu_s() - self.busy) - (children_cpu_s() - self.child)
    self.cores = max(others, 0.0) / max(wall, 1e-9)


def run(side: str, cmd: list[str]) -> tuple[dict | None, str]:
  """Run one side, echo its stdout, return (its RESULT or None, a status); stderr goes to a log whose
  tail is shown only on failure (progress bars and library warnings otherwise drown the figures).
  The RESULT gains `others_cores`: what the rest of the machine used meanwhile."""
  print(f"--- {side}: {' '.join(cmd)}", flush=True)
  result = None
  with tempfile.TemporaryFile("w+") as err:
    with OthersLoad() as load, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True) as p:
      for line in p.stdout:
        if line.startswith(RESULT):
          result = json.loads(line[len(RESULT):])
        else:
          print("  " + line, end="", flush=True)
    print(f"--- {side}: other processes used {load.cores:.2f} cores meanwhile", flush=True)
    if p.returncode == 0 and result is not None:
      return {**result, "others_cores": load.cores}, "ok"
    err.seek(0)
    print("".join("  ! " + x for x in err.readlines()[-25:]), end="")
  status = "not run (no memory)" if p.returncode == NO_MEMORY else f"failed (exit {p.returncode})"
  print(f"--- {side}: {status}", flush=True)
  return None, status


# --------------------------------------------------------------------------- figures


def summary(side: str, s: Shape, r: dict) -> dict:
  """The table's figures for one side: seconds per unit of work, tok/s, peak RSS (GRPO: its parts too)."""
  return {**_figures(side, s, r), "others": r["others_cores"]}


def _figures(side: str, s: Shape, r: dict) -> dict:
  if s.kind == "sft":
    sec = r["ms_step"] / 1000 if side == "ours" else r["s_step"]
    return {"s": sec, "tok_s": r["tok_s"], "rss": r["rss_gib"], "lora_params": r["lora_params"]}
  if s.kind == "generate":
    return {"s": r["seconds"], "tok_s": r["tok_s"], "rss": r["rss_gib"]}
  sec = r["total_s"]
  out = {"s": sec, "tok_s": s.prompts * s.group * s.new / sec, "rss": r["rss_gib"]}
  if side == "ours":
    parts = {"rollout": r["rollout_s"], "reference": r["reference_s"], "train": r["train_s"]}
    parts["other"] = sec - sum(parts.values())
    return {**out, "parts": parts, "sampler_alone_s": r["sampler_s"]}
  parts = {"generate": r["generate_s"], "ref+reward": r["ref_reward_s"], "train": r["train_s"]}
  return {**out, "parts": parts, "reference_s": r["reference_s"], "reward_s": r["reward_s"],
          "lora_params": r["lora_params"], "prompt_tokens": r["prompt_tokens"][0][0], "grad_ckpt": r["grad_ckpt"]}


def cell(x: dict | None, status: str) -> str:
  return status if x is None else f"{x['s']:.2f} s, {x['tok_s']:.0f} tok/s, {x['rss']:.2f} GiB"


def ratio(row: dict) -> str:
  t, o = row["theirs"], row["ours"]
  return "-" if t is None or o is None else f"{t['s'] / o['s']:.2f}x"


def parts_lines(row: dict) -> list[str]:
  """The GRPO split of both sides, one line each (seconds, medians)."""
  s, out = row["shape"], []
  t, o = row["theirs"], row["ours"]
  head = f"- {s.name} round {row['round']}"
  if t:
    out.append(f"{head}, theirs: " + ", ".join(f"{k} {v:.1f} s" for k, v in t["parts"].items())
               + f" (of ref+reward: reference {t['reference_s']:.1f} s, reward {t['reward_s']:.3f} s); "
               f"prompt {t['prompt_tokens']} tokens; gradient checkpointing {t['grad_ckpt']}")
  if o:
    out.append(f"{head}, ours: " + ", ".join(f"{k} {v:.1f} s" for k, v in o["parts"].items())
               + f" (the sampler alone at this shape, wall time: {o['sampler_alone_s']:.1f} s)")
  return out


def others(row: dict) -> str:
  return " / ".join("-" if row[side] is None else f"{row[side]['others']:.1f}" for side in ("theirs", "ours"))


def table(rows: list[dict]) -> list[str]:
  out = [("| work | shape | round | theirs (s, tok/s, RSS) | ours (s, tok/s, RSS) | theirs_s / ours_s "
         "| others' CPU, cores (theirs / ours) |"),
         "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    s = r["shape"]
    out.append(f"| {WORK[s.kind]} | {s.name}: {s.describe()} | {r['round']} | {cell(r['theirs'], r['theirs_status'])} "
               f"| {cell(r['ours'], r['ours_status'])} | {ratio(r)} | {others(r)} |")
  return out


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return "unknown"


def versions(py: Path, names: tuple[str, ...]) -> str:
  """Installed versions in that interpreter's environment (metadata only: nothing heavy is imported)."""
  code = ("import importlib.metadata as m, sys; "
          "print(', '.join(f'{n} {m.version(n)}' for n in sys.argv[1:]))")
  out = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True, check=False)
  return out.stdout.strip() or f"unknown ({out.stderr.strip().splitlines()[-1:]})"


def footer(rows: list[dict], start: dict, wall: float) -> list[str]:
  threads = {r["theirs"].get("threads") for r in rows if r["theirs"]} - {None}
  lines = [f"- date (UTC): {start['date']}; total wall time {wall / 60:.1f} min",
           f"- load average (1, 5, 15 min) at start {start['load']}, at end {tuple(round(x, 2) for x in os.getloadavg())}",
           f"- CPU: {cpu_model()} x {os.cpu_count()} logical cores",
           f"- theirs: {versions(PEERS_PY, ('torch', 'transformers', 'peft', 'trl', 'accelerate'))}"
           + (f"; torch threads {', '.join(map(str, sorted(threads)))}" if threads else ""),
           f"- ours: {versions(OURS_PY, ('jax', 'jaxlib'))}",
           ("- theirs_s / ours_s > 1: ours takes less time for the same work; tok/s: SFT tokens trained, decode "
            "and GRPO tokens generated (rows x new) per second"),
           ("- others' CPU: what processes other than the side used while it ran (from /proc/stat): above ~0.2 "
            "cores the machine was shared and the ratio is not a clean comparison (torch's worker threads, which "
            "spin-wait, slow down far more than XLA's on a shared CPU)")]
  grpo = [x for r in rows if r["shape"].kind == "grpo" for x in parts_lines(r)]
  if grpo:
    lines += ["", "GRPO parts (median seconds per step):", *grpo]
  return lines


# --------------------------------------------------------------------------- main


def _args(argv=None):
  ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  ap.add_argument("--rounds", type=int, default=1)
  ap.add_argument("--only", default="", help="comma-separated shapes (default: all): " + ",".join(shapes(False)))
  ap.add_argument("--small", action="store_true", help="shrunken shapes for a quick smoke run")
  ap.add_argument("--theirs-no-grad-ckpt", action="store_true",
                  help="TRL's GRPO without gradient checkpointing (4x4x512 then needs ~30 GiB)")
  a = ap.parse_args(argv)
  known = shapes(a.small)
  a.names = [x for x in a.only.split(",") if x] or list(known)
  unknown = [x for x in a.names if x not in known]
  if unknown:
    ap.exit(2, f"error: unknown shape(s) {', '.join(unknown)}; known: {', '.join(known)}\n")
  return a


def main(argv=None):
  a = _args(argv)
  if not PEERS_PY.exists() or not (MODEL_DIR / "model.safetensors").exists():
    print("error: no peers environment (benchmarks/peers/.venv): run bash benchmarks/peers/setup.sh first")
    sys.exit(2)
  start = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
           "load": tuple(round(x, 2) for x in os.getloadavg()), "t": time.perf_counter()}
  rows = []
  for rnd in range(1, a.rounds + 1):
    order = ("ours", "theirs") if rnd % 2 else ("theirs", "ours")
    for name in a.names:
      s = shapes(a.small)[name]
      row = {"shape": s, "round": rnd}
      for side in order:
        print(f"\n=== {name} ({s.describe()}), round {rnd}: {side}", flush=True)
        r, status = run(side, command(side, s, grpo_ckpt=not a.theirs_no_grad_ckpt))
        row[side], row[f"{side}_status"] = (summary(side, s, r) if r else None), status
        if r and side == "theirs":
          row[side]["threads"] = r["versions"]["torch_threads"]
      rows.append(row)
  lines = table(rows) + [""] + footer(rows, start, time.perf_counter() - start["t"])
  text = "\n".join(lines) + "\n"
  print("\n" + text, end="")
  (HERE / "last_run.md").write_text(f"# peers vs ours{' (--small)' if a.small else ''}\n\n" + text)
  sys.exit(0 if all(r["ours"] and r["theirs"] for r in rows) else 1)


if __name__ == "__main__":
  main()
