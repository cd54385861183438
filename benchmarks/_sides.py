"""Run each side of a benchmark comparison in its own interpreter, so each peak RSS is its own.

A side is the same script re-run with `--only <side>`; it prints its figures and ends with one
`RESULT {json}` line. A side whose step would not fit in MemAvailable refuses to start it
(exit 3) instead of getting itself, or a neighbour on this shared machine, OOM-killed.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile

RESULT = "RESULT "  # prefix of the machine-readable line each side prints
NO_MEMORY = 3  # exit code of a side that refused to start a step it has no memory for


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def meminfo_gib(key: str, path: str = "/proc/meminfo") -> float:
  with open(path) as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def mem_guard(side: str, est: dict, enforce: bool = True) -> None:
  """Print XLA's buffer estimate for one step; exit(NO_MEMORY) if it exceeds MemAvailable.

  The step's new allocations are its temp buffers plus its outputs (+1 GiB slack: a Tunix
  SFT run peaked at 0.7 GiB above RSS-before + temp + outputs).
  """
  need = (est["temp"] + est["out"]) / 2**30 + 1.0
  avail = meminfo_gib("MemAvailable")
  print(f"[{side}] XLA buffers per step: temp {est['temp'] / 2**30:.2f} GiB, args {est['args'] / 2**30:.2f} GiB, "
        f"outputs {est['out'] / 2**30:.2f} GiB (RSS now {meminfo_gib('VmRSS', '/proc/self/status'):.2f} GiB, "
        f"MemAvailable {avail:.2f} GiB)", flush=True)
  if need > avail and enforce:
    print(f"[{side}] NOT RUN: a step needs ~{need:.1f} GiB more, only {avail:.1f} GiB available "
          f"(--no-mem-guard to try anyway, or smaller shapes)", flush=True)
    sys.exit(NO_MEMORY)


def emit(result: dict) -> None:
  print(RESULT + json.dumps(result), flush=True)


def run_side(script: str, side: str, argv: list[str]) -> dict | None:
  """Run `script --only side argv...` in a fresh interpreter, echo its output, return its RESULT.

  None when the side refused for lack of memory or was killed (the reason is printed).
  """
  cmd = [sys.executable, script, "--only", side, *argv]
  print(f"--- {side}: {' '.join(cmd[1:])}", flush=True)
  result = None
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
    for line in p.stdout:
      if line.startswith(RESULT):
        result = json.loads(line[len(RESULT):])
      else:
        print(line, end="", flush=True)
  if p.returncode == NO_MEMORY:
    return None
  if p.returncode < 0:
    print(f"[{side}] killed by signal {-p.returncode}" + (" (likely the OOM killer)" if p.returncode == -9 else ""))
    return None
  if p.returncode != 0 or result is None:
    raise SystemExit(f"{side} run failed (exit {p.returncode})")
  return result


@contextlib.contextmanager
def throwaway_compile_cache():
  """A persistent XLA compilation cache in a temp dir for the duration of the block.

  A memory estimate AOT-compiles a step once; when the trainer's own jit lowers to the same
  program, this cache lets it load that executable instead of compiling it again.
  """
  import jax

  cache_dir = tempfile.mkdtemp(prefix="bench_xla_cache_")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  try:
    yield
  finally:
    shutil.rmtree(cache_dir, ignore_errors=True)
