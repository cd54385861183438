"""Milliseconds per reward on adversarial ~100 KB completions (target: < 10 ms each).

    python benchmarks/bench_rewards.py [--repeats 5]

Prints the median time of one call scoring a single completion, per input,
schema and reward. The last table is math_verify's worst case on short hostile
answers, bounded by the SIGALRM budget in rewards.py rather than by length.
"""

import argparse
import functools
import statistics
import time

from tpu_reason import rewards
from tpu_reason.tags import SCHEMAS

CHECKPOINTS = ["4 * 2 = 8", "3 * 3 = 9", "8 + 9 = 17", "20 - 17", "1", "1" * 50]
GOLD = "3"
STEPS = "4 × $2 = $8.00, 1,000 + 3 x 3 = 9. "

INPUTS = {
    "reasoning_open_x10k": "<reasoning>" * 10000,
    "answer_open_x10k": "<reasoning>r</reasoning>" + "<answer>" * 10000,
    "one_comma_x50k": "1," * 50000,
    "answer_one_comma": "<reasoning>x</reasoning><answer>" + "1," * 50000 + "</answer>",
    "nested_tags": "<reasoning><answer>" * 2500 + "</answer></reasoning>" * 2500,
    "long_reasoning": "<reasoning>" + STEPS * 3000 + "</reasoning><answer>3</answer>",
    "digits_only": "<reasoning>" + "1" * 100_000 + "</reasoning><answer>3</answer>",
    "boxed_x14k": "<think>a</think>" + "\\boxed{" * 14000 + "}" * 14000,
    "boxed_unclosed": "<think>a</think>\\boxed{" + "{" * 100_000,
    "unicode": "<reasoning>" + "\U0001f600×÷−é" * 20000,
}

HOSTILE_ANSWERS = ["9^9^9^9", "(" * 40 + "1" + ")" * 40, "\\sqrt{" * 100 + "2" + "}" * 100, "x" * 999]


def median_ms(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  rewards.answers_match("1/2", "0.5")  # import and warm up sympy outside the timings
  names = list(rewards.REWARDS)
  print(f"{'input':<22}{'KB':>6} {'schema':<10}" + "".join(f"{n:>12}" for n in names))
  worst = 0.0
  for label, text in INPUTS.items():
    for schema in SCHEMAS:
      row = []
      for name in names:
        fn = rewards.REWARDS[name]
        # bound now: median_ms calls it before the loop moves on, but the linter cannot know that
        call = functools.partial(fn, [""], [text], answer=[GOLD], checkpoints=[CHECKPOINTS], schema=schema)
        ms = median_ms(call, args.repeats)
        row.append(ms)
        worst = max(worst, ms)
      cells = "".join(f"{ms:>12.2f}" for ms in row)
      print(f"{label:<22}{len(text.encode()) / 1024:>6.0f} {schema:<10}{cells}")
  print(f"worst: {worst:.2f} ms per 100 KB completion (target < 10 ms)")

  print("\nmath_verify fallback on hostile short answers (first call, uncached):")
  for answer in HOSTILE_ANSWERS:
    rewards._symbolic_equal.cache_clear()
    ms = median_ms(functools.partial(rewards.answers_match, answer, "2"), 1)
    print(f"  {answer[:24]!r:<30}{len(answer):>5} chars {ms:>9.1f} ms")


if __name__ == "__main__":
  main()
