"""Decode throughput: 4 prompts x G=4 samples x 512 new tokens on the embedded SmolLM2 (f32, CPU).

Prints tokens/s (the HF `generate` reference on this machine: 114 tok/s), ms per decode step,
and the memory-bandwidth floor of decode (weight bytes / measured copy bandwidth).
Ends with `RESULT {json}` (benchmarks/_sides.py): rows, new tokens, seconds (median wall time of the
--reps timed calls), tok/s, ms/step, peak RSS; benchmarks/peers/compare.py reads it.
Usage: python benchmarks/bench_generate.py [--new 512] [--group 4] [--prompts 4] [--reps 1]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from _sides import emit, peak_rss_gib

from tpu_reason import models
from tpu_reason.config import SamplingCfg
from tpu_reason.sampling import sampler

PROMPTS = ["What is 7 times 8?", "Name three colors.", "Explain why the sky is blue.", "Count from 1 to 20."]


def copy_bandwidth(nbytes=512 << 20) -> float:
  """GB/s of a large device-to-device copy: the floor for streaming the weights once per step."""
  x = jnp.ones(nbytes // 4, jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  f(x).block_until_ready()
  t = time.perf_counter()
  for _ in range(5):
    f(x).block_until_ready()
  return 2 * nbytes * 5 / (time.perf_counter() - t) / 1e9


def _args():
  ap = argparse.ArgumentParser()
  ap.add_argument("--new", type=int, default=512)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--reps", type=int, default=1, help="timed calls after the compiling one")
  return ap.parse_args()


def main():
  a = _args()
  m = models.load(a.model)
  params = jax.tree.map(jnp.asarray, m.params)
  ids = [m.encode(m.chat_prompt(p)) for p in (PROMPTS * 4)[: a.prompts]]
  tokens, mask = sampler.left_pad(ids, 64, 0)
  s = SamplingCfg(max_new_tokens=a.new, temperature=1.0, top_k=50)

  def run(seed):
    return sampler.generate(params, m.cfg, m.tokenizer, tokens, mask, eos_ids=(-1,), pad_id=m.pad_id, sampling=s,
                            group=a.group, key=jax.random.key(seed), chunk=a.new)

  t = time.perf_counter()
  run(0)
  compile_s = time.perf_counter() - t
  cpu = time.process_time()
  walls, gens = [], []
  for seed in range(1, a.reps + 1):
    t = time.perf_counter()
    gens.append(run(seed))  # returns host arrays: the wall time covers the whole decode
    walls.append(time.perf_counter() - t)
  cpu = (time.process_time() - cpu) / a.reps
  out = result(a, gens, walls, compile_s)
  _print(a, m, params, out, cpu)
  emit(out)


def _print(a, m, params, out: dict, cpu: float) -> None:
  # wall time of the whole call, the peer's measure too (Generation.seconds stopped before the last decode
  # chunk had run until 7aea1a5: the printout shows both, so a regression of that clock shows up)
  n, sec, rows = out["rows"] * a.new, out["seconds"], out["rows"]
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  bw = copy_bandwidth()
  floor = rows * bw * 1e9 / weight_bytes
  print(f"model {a.model}: {rows} sequences x {a.new} new tokens (prompts {a.prompts} x group {a.group})")
  print(f"first call (compile + run): {out['first_call_s']:.1f} s")
  print(f"decode: {n} tokens in {sec:.1f} s = {n / sec:.0f} tok/s ({1000 * sec / a.new:.0f} ms/step; wall time, "
        f"median of {len(out['times'])} calls; the sampler's own clock: {out['sampler_s']:.1f} s); "
        f"HF generate reference 114 tok/s -> {n / sec / 114:.2f}x")
  print(f"process CPU time {cpu:.1f} s ({cpu / sec:.2f} cores busy; below 2 means the machine was shared)")
  print(f"bandwidth floor: {weight_bytes / 1e9:.2f} GB weights/step at {bw:.0f} GB/s copy -> {floor:.0f} tok/s")
  print(f"compute floor: {2 * m.cfg.num_params * rows / 1e9:.1f} GFLOP/step")
  print(f"peak RSS {out['rss_gib']:.2f} GiB")


def result(a, gens, walls, compile_s) -> dict:
  """The RESULT figures; seconds: median wall time of a call (the sampler's own clock is `sampler_s`)."""
  want = a.prompts * a.group * a.new
  if any(int(g.lengths.sum()) != want for g in gens):
    raise RuntimeError(f"generated {[int(g.lengths.sum()) for g in gens]} tokens, expected {want} per call")
  sec = statistics.median(walls)
  return {"side": "ours", "rows": a.prompts * a.group, "new_tokens": a.new, "seconds": sec, "tok_s": want / sec,
          "ms_step": 1000 * sec / a.new, "rss_gib": peak_rss_gib(), "first_call_s": compile_s, "times": walls,
          "sampler_s": statistics.median(g.seconds for g in gens)}


if __name__ == "__main__":
  main()
