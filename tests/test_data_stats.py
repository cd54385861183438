"""Tests for tpu_reason.data.stats: reasoning:answer token ratios and reasoning ROUGE-L."""

import pytest

from tpu_reason import tags
from tpu_reason.data import stats
from tpu_reason.data.stats import TraceLengths


class WordTokenizer:
  """One token per whitespace-separated word: lengths can be counted by hand."""

  def encode(self, text, add_special_tokens=False):
    return text.split()


def test_trace_lengths_and_ratio():
  got = stats.trace_lengths(WordTokenizer(), [("a b c d", "x y"), ("", "42"), ("  ", "7")])
  assert got == [TraceLengths(4, 2), TraceLengths(0, 1), TraceLengths(0, 1)]
  assert [t.ratio for t in got] == [2.0, 0.0, 0.0]
  assert TraceLengths(3, 0).ratio == 3.0  # never divides by zero


def test_ratio_summary_counts_rows_below_one_to_one():
  lengths = [TraceLengths(r, 1) for r in (0, 0, 1, 2, 3, 4, 10, 20, 30, 100)] + [TraceLengths(1, 4)]
  s = stats.ratio_summary(lengths)
  assert s["n"] == 11 and s["below_1"] == 3 and s["no_reasoning"] == 2
  assert (s["min"], s["median"], s["max"]) == (0.0, 3.0, 100.0)
  assert s["mean"] == pytest.approx((0 + 0 + 1 + 2 + 3 + 4 + 10 + 20 + 30 + 100 + 0.25) / 11)
  assert stats.ratio_summary([]) == {"n": 0}
  line = stats.format_ratio_summary(s)
  assert "n=11" in line and "median=3.0" in line and "below 1:1 3 rows (no reasoning: 2)" in line
  assert "no rows" in stats.format_ratio_summary({"n": 0})


def test_completion_parts():
  schema = tags.get_schema("reasoning")
  completion = schema.render_target("2 + 2 = 4", "4")[len(schema.primer):]
  assert stats.completion_parts(schema, completion) == ("2 + 2 = 4", "4")


def test_rouge_l_matches_the_longest_common_subsequence_by_hand():
  # LCS of "the cat sat on the mat" and "the cat on a mat" = "the cat on mat" (4 tokens):
  # P = 4/5, R = 4/6, F = 2PR / (P + R) = 8/11
  (score,) = stats.rouge_l(["the cat on a mat"], ["the cat sat on the mat"])
  assert score == pytest.approx(8 / 11)
  assert stats.rouge_l(["same words here"], ["Same words, here!"]) == [pytest.approx(1.0)]
  assert stats.rouge_l(["nothing shared"], ["completely different"]) == [0.0]


def test_reasoning_rouge_l_reads_the_generated_reasoning_block():
  schema = tags.get_schema("reasoning")
  generated = [
    "<reasoning>\nthe cat on a mat\n</reasoning>\n<answer>\n1\n</answer>",
    "<reasoning>\nfoo\n</reasoning><answer>2</answer>",
    "no tags at all",
  ]
  scores = stats.reasoning_rouge_l(schema, generated, ["the cat sat on the mat", "", "the cat"])
  assert scores[0] == pytest.approx(8 / 11)
  assert scores[1] is None  # no reference trace: not scored
  assert scores[2] == 0.0  # no reasoning block generated: nothing matches
