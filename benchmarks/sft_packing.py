"""One epoch of the CPU default's SFT data, completion buckets against packed rows (`data.pack`).

Both sides train the same examples (the no-argument recipe's 480 gsm_symbolic rows, or the
recipe/overrides given) with the same model, LoRA and optimizer, in one process, alternating:
  bucketed  rows of P + 128 or P + 256 tokens (the default's completion buckets), batch B
  packed    rows of P + 256 tokens holding several examples each, batch B
A round times `--steps` steps of every shape (bucketed: each bucket; packed: its one width)
after a compile step; the epoch time is steps per epoch x the median step time per shape.
Printed per side: real and padded tokens per epoch, s/step per shape, real and padded tok/s,
epoch seconds; then the packed/bucketed epoch-time ratio.

Usage: python benchmarks/sft_packing.py [--rounds 2] [--steps 2] [key=value ...]
"""

import argparse
import statistics
import time

import jax

from tpu_reason import config_io, lora as lora_lib, sft
from tpu_reason.config import Config
from tpu_reason.data import batch as data_batch, loader, packing


def _args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--steps", type=int, default=2, help="timed steps per shape and round")
  ap.add_argument("overrides", nargs="*", help="config overrides (key=value)")
  return ap.parse_args()


def shapes(rows) -> dict[int, list]:
  """{row width: rows}: buckets for plain examples, one width for packed rows."""
  return loader.group_by_bucket(rows)


def time_steps(tr: sft.Trainer, state, rows, n: int, bs: int) -> tuple[object, list[float]]:
  times = []
  for i in range(n):
    batch = data_batch.collate_packed if isinstance(rows[0], packing.PackedRow) else data_batch.collate
    b = tr.place_batch(batch([rows[(i * bs + k) % len(rows)] for k in range(bs)], bs))
    t = time.perf_counter()
    state, m = tr.step_fn(state, tr.params, b)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return state, times


def main():
  a = _args()
  sides = {}
  for pack in (False, True):
    cfg = config_io.load(Config, None, [*a.overrides, f"data.pack={str(pack).lower()}", "output_dir=/tmp/sft_packing"])
    sides["packed" if pack else "bucketed"] = sft.build(cfg)
  bs = next(iter(sides.values())).cfg.train.batch_size
  states, times = {}, {name: {} for name in sides}
  for name, tr in sides.items():
    state = sft.init_state(lora_lib.init(tr.model.cfg, tr.cfg.lora, jax.random.key(0)), tr.optimizer, 0)
    state = jax.device_put(state, tr.state_sharding)
    for width, rows in shapes(tr.train).items():
      t = time.perf_counter()
      state, _ = time_steps(tr, state, rows, 1, bs)
      print(f"[{name}] shape {width}: compile + first step {time.perf_counter() - t:.1f} s", flush=True)
      times[name][width] = []
    states[name] = state
  for r in range(a.rounds):
    for name, tr in (sides.items() if r % 2 == 0 else reversed(sides.items())):
      for width, rows in shapes(tr.train).items():
        states[name], ts = time_steps(tr, states[name], rows, a.steps, bs)
        times[name][width] += ts
        print(f"round {r + 1} {name} shape {width}: {' '.join(f'{t:.2f}' for t in ts)} s/step", flush=True)
  report(sides, times, bs)


def report(sides, times, bs):
  epoch = {}
  print(f"\none epoch, batch {bs} rows, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
  for name, tr in sides.items():
    packed = name == "packed"
    # a bucket is a completion width (the prompt's P comes on top); a packed row is its whole width
    extra = 0 if packed else tr.cfg.data.max_prompt_tokens
    rows = {b: len(g) for b, g in shapes(tr.train).items()}
    steps = {b: n // bs for b, n in rows.items()}  # full batches only, as training
    med = {b: statistics.median(times[name][b]) for b in rows}
    secs = sum(steps[b] * med[b] for b in rows)
    padded = sum(steps[b] * bs * (b + extra) for b in rows)
    real = sum(int((r.segments_L > 0).sum()) if packed else r.prompt_len + r.completion_len for r in tr.train)
    real = real * sum(steps[b] * bs for b in rows) / sum(rows.values())
    epoch[name] = secs
    shape = ", ".join(f"{steps[b]} steps x {bs} x {b + extra} tok at {med[b]:.2f} s" for b in sorted(rows))
    print(f"  {name:8s} {len(tr.train)} rows ({shape}): {secs:7.1f} s/epoch, real {real / secs:6.0f} tok/s,"
          f" padded {padded / secs:6.0f} tok/s; real tokens {real / padded:.0%} of padded")
  print(f"  packed / bucketed epoch time: {epoch['packed'] / epoch['bucketed']:.2f}"
        f" (speed-up {epoch['bucketed'] / epoch['packed']:.2f}x, same examples, same model)")


if __name__ == "__main__":
  main()
