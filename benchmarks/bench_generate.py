"""Decode throughput: 4 prompts x G=4 samples x 512 new tokens on the embedded SmolLM2 (f32, CPU).

Prints tokens/s (the HF `generate` reference on this machine: 114 tok/s), ms per decode step,
and the memory-bandwidth floor of decode (weight bytes / measured copy bandwidth).
Usage: python benchmarks/bench_generate.py [--new 512] [--group 4] [--prompts 4]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from tpu_reason import models, sampler
from tpu_reason.config import SamplingCfg

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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--new", type=int, default=512)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--model", default="smollm2-135m")
  a = ap.parse_args()
  m = models.load(a.model)
  params = jax.tree.map(jnp.asarray, m.params)
  ids = [m.encode(m.chat_prompt(p)) for p in (PROMPTS * 4)[: a.prompts]]
  tokens, mask = sampler.left_pad(ids, 64, 0)
  s = SamplingCfg(max_new_tokens=a.new, temperature=1.0, top_k=50)
  run = lambda seed: sampler.generate(params, m.cfg, m.tokenizer, tokens, mask, eos_ids=(-1,),  # noqa: E731
                                      sampling=s, group=a.group, key=jax.random.key(seed), chunk=a.new)
  t = time.perf_counter()
  run(0)
  compile_s = time.perf_counter() - t
  cpu = time.process_time()
  gen = run(1)
  cpu = time.process_time() - cpu
  n = int(gen.lengths.sum())
  rows = a.prompts * a.group
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  bw = copy_bandwidth()
  floor = rows * bw * 1e9 / weight_bytes
  print(f"model {a.model}: {rows} sequences x {a.new} new tokens (prompts {a.prompts} x group {a.group})")
  print(f"first call (compile + run): {compile_s:.1f} s")
  print(f"decode: {n} tokens in {gen.seconds:.1f} s = {n / gen.seconds:.0f} tok/s "
        f"({1000 * gen.seconds / a.new:.0f} ms/step); HF generate reference 114 tok/s -> {n / gen.seconds / 114:.2f}x")
  print(f"process CPU time {cpu:.1f} s ({cpu / gen.seconds:.2f} cores busy; below 2 means the machine was shared)")
  print(f"bandwidth floor: {weight_bytes / 1e9:.2f} GB weights/step at {bw:.0f} GB/s copy -> {floor:.0f} tok/s")
  print(f"compute floor: {2 * m.cfg.num_params * rows / 1e9:.1f} GFLOP/step")


if __name__ == "__main__":
  main()
