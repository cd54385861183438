"""GRPO variants from one SFT run at the same sampling cost: held-out accuracy, zero-std groups, wall time.

Each variant is a `python -m tpu_reason.grpo` run (its own process, as a user runs it) from the same
SFT run, with the same prompt stream, seed and `grpo.max_completions` budget (default: the no-argument
run's 30 steps x 2 prompts x G=4 = 240 completions), then the same greedy held-out eval: the first
`--rows` prompts of `data.eval_seed` that do not occur in training. Prints a Markdown table.

  python benchmarks/grpo_variants.py      # every variant on one-digit a + b (grpo alone: 10 min idle)
  python benchmarks/grpo_variants.py --variants grpo,dynamic \\
      --task "basic_arithmetic:min_terms=3,max_terms=3,min_digits=1,max_digits=1"   # a multi-step task

`gspo` and its token-level twin `grpo_mb1` update twice per rollout (two mini-batches of one prompt), so
that the second update is off-policy: on-policy (one update a rollout) every ratio is 1 and GSPO is GRPO.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

VARIANTS = {
    "grpo": [],  # the no-argument run
    "dynamic": ["grpo.dynamic_sampling=true"],
    # the same number of updates as `grpo` (30 steps of 2 kept groups), whatever it samples: no budget
    "dynamic_steps": ["grpo.dynamic_sampling=true", "grpo.max_completions=0"],
    "grpo_mb1": ["grpo.mini_batch=1"],
    "gspo": ["grpo.mini_batch=1", "grpo.importance_level=sequence"],
}


def run_variant(name: str, args, out: Path) -> dict:
  overrides = [f"output_dir={out}", f"grpo.init={args.init}", f"grpo.max_completions={args.completions}",
               f"train.eval_generate={args.rows}", f"data.eval_size={args.eval_size}",
               "grpo.eval_every=1000"]  # no mid-run evals: every variant pays for the same two
  if args.task:
    overrides.append(f"grpo.task={args.task}")
  cmd = [sys.executable, "-m", "tpu_reason.grpo", *overrides, *args.overrides, *VARIANTS[name]]
  print("$", " ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  with (out.parent / f"{out.name}.log").open("w") as log:
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
  wall = time.perf_counter() - t0
  summary = json.loads((out / "summary.json").read_text())
  rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r.get("split") == "train"]
  prompts = yaml.safe_load((out / "config.yaml").read_text())["grpo"]["prompts"]
  drawn = [r.get("dynamic/groups_drawn", prompts) for r in train]  # every group sampled, kept or not
  groups = sum(drawn)
  zero = sum(r["frac_reward_zero_std"] * n for r, n in zip(train, drawn)) / groups
  return {"variant": name, "steps": len(train), "groups_drawn": groups, "frac_reward_zero_std": zero,
          "before": summary["before"], "after": summary["after"], "wall_s": wall,
          "train_reward_first": summary.get("first_20pct_reward"), "train_reward_last": summary.get("last_20pct_reward")}


def table(results: list[dict]) -> str:
  sft = results[0]["before"]
  lines = [f"| variant | steps | groups drawn | frac_reward_zero_std | held-out accuracy ({sft['rows']} rows) | "
           "vs SFT | format | mean tokens | wall |", "|---|---|---|---|---|---|---|---|---|",
           f"| SFT (start) | - | - | - | {sft['accuracy']:.1%} | - | {sft['format_accuracy']:.1%} | "
           f"{sft['mean_completion_tokens']:.1f} | - |"]
  for r in results:
    a = r["after"]
    gain = 100 * (a["accuracy"] - r["before"]["accuracy"])
    lines.append(f"| {r['variant']} | {r['steps']} | {r['groups_drawn']:.0f} | {r['frac_reward_zero_std']:.2f} | "
                 f"{a['accuracy']:.1%} | {gain:+.1f} pp | {a['format_accuracy']:.1%} | "
                 f"{a['mean_completion_tokens']:.1f} | {r['wall_s'] / 60:.1f} min |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--init", default="auto", help="the SFT run to start from (default: the latest finished one)")
  p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
  p.add_argument("--task", default="", help="grpo.task (default: the CPU default's one-digit a + b)")
  p.add_argument("--completions", type=int, default=240, help="grpo.max_completions of every variant")
  p.add_argument("--rows", type=int, default=100, help="held-out prompts generated (train.eval_generate)")
  p.add_argument("--eval-size", type=int, default=160, help="data.eval_size: enough rows left after those in training")
  p.add_argument("--out", default="runs/grpo_variants", help="one run directory per variant under here")
  p.add_argument("overrides", nargs="*", help="more key=value settings for every variant")
  args = p.parse_args()
  names = args.variants.split(",")
  if unknown := [n for n in names if n not in VARIANTS]:
    sys.exit(f"error: unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
  root = Path(args.out)
  root.mkdir(parents=True, exist_ok=True)
  results = []
  for name in names:
    results.append(run_variant(name, args, (root / name).resolve()))
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results), flush=True)


if __name__ == "__main__":
  main()
