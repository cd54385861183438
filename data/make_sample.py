"""Regenerate data/gsm_symbolic_sample.jsonl: `python data/make_sample.py [--size 64] [--seed 0]`.

Rows come from reasoning-gym's gsm_symbolic generator (offline, deterministic
for a seed), normalised by `sources.load_reasoning_gym` (chain of thought ->
reasoning, `a op b = c` steps -> checkpoints) and written in the canonical
teacher format by `sources.records_to_teacher_jsonl`.
"""

from __future__ import annotations

import argparse
import pathlib

from tpu_reason.data import sources

OUT = pathlib.Path(__file__).resolve().parent / "gsm_symbolic_sample.jsonl"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  args = parser.parse_args()
  records, report = sources.load_reasoning_gym("gsm_symbolic", seed=args.seed, size=args.size)
  n = sources.records_to_teacher_jsonl(records, args.out)
  print(f"{report}\nwrote {n} rows to {args.out}")


if __name__ == "__main__":
  main()
