"""Where a decode step's time goes: one `sampler.generate` call traced with `jax.profiler`, its XLA ops summed.

The embedded SmolLM2 (f32, CPU), 1 prompt x G=4 rows, --new tokens, top-k 50 (bench_generate's sampling).
Prints ms per step untraced, then each kind of op's share of the traced op time: YNNPACK fusions (the
matmuls, and a few reductions), dynamic-slice / copy fusions (XLA:CPU's copies of a layer's weights out of
the stacked arrays inside the layer scan), the rest; and the ten costliest ops by name.
Usage: python benchmarks/profile_decode.py [--new 64] [--trace-dir /tmp/decode_trace]
"""

import argparse
import collections
import gzip
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason import models
from tpu_reason.config import SamplingCfg
from tpu_reason.sampling import sampler

KINDS = (("YNNPACK fusions (matmuls)", "ynn_fusion"), ("weight slices and copies", "slice"), ("weight slices and copies", "copy"))


def kind(op: str) -> str:
  return next((name for name, part in KINDS if part in op), "other")


def op_times(trace_dir: Path) -> collections.Counter:
  """Total microseconds per XLA op name in the newest perfetto trace under `trace_dir`."""
  newest = max(trace_dir.rglob("*.json.gz"), key=lambda f: f.stat().st_mtime)
  events = json.load(gzip.open(newest))
  events = events["traceEvents"] if isinstance(events, dict) else events
  total = collections.Counter()
  for e in events:
    # XLA's ops only (fusion.3, while.2): not Python frames ("$file:line f"), the executor's own spans
    # ("ThunkExecutor::Execute") or host calls ("np.asarray(jax.Array)")
    if e.get("ph") == "X" and not any(c in e["name"] for c in "$:( "):
      total[e["name"]] += e.get("dur", 0)
  return total


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--trace-dir", type=Path, default=Path("/tmp/decode_trace"))
  a = ap.parse_args()
  m = models.load("smollm2-135m")
  params = jax.tree.map(jnp.asarray, m.params)
  ids = m.encode(m.chat_prompt("Explain why the sky is blue."))
  width = sampler.prompt_width(len(ids))
  tokens = np.full((1, width), m.pad_id, np.int32)
  tokens[0, width - len(ids):] = ids
  mask = np.zeros((1, width), bool)
  mask[0, width - len(ids):] = True
  sampling = SamplingCfg(max_new_tokens=a.new, temperature=1.0, top_k=50)

  def run(seed):
    return sampler.generate(params, m.cfg, m.tokenizer, tokens, mask, eos_ids=(-1,), pad_id=m.pad_id,
                            sampling=sampling, group=4, key=jax.random.key(seed), chunk=a.new)

  run(0)  # compile
  t = time.perf_counter()
  run(1)
  print(f"decode, 1 prompt x G=4 x {a.new} new tokens: {(time.perf_counter() - t) / a.new * 1e3:.1f} ms/step untraced")
  jax.profiler.start_trace(str(a.trace_dir), create_perfetto_trace=True)
  run(2)
  jax.profiler.stop_trace()
  ops = op_times(a.trace_dir)
  total = sum(ops.values())
  by_kind = collections.Counter()
  for op, us in ops.items():
    by_kind[kind(op)] += us
  print(f"traced op time {total / 1e6:.2f} s (tracing slows the ops; shares, not seconds, are the figure)")
  for name, us in by_kind.most_common():
    print(f"  {name:26s} {us / 1e6:6.2f} s  {100 * us / total:4.0f} %")
  print("costliest ops:")
  for op, us in ops.most_common(10):
    print(f"  {op:40s} {us / 1e6:6.2f} s")


if __name__ == "__main__":
  main()
