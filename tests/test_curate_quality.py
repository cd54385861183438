"""Tests for tpu_reason.curate.quality: one reason per malformed row, exact and near duplicates."""

import pytest

from tpu_reason import tags
from tpu_reason.curate import quality
from tpu_reason.data.prepare import question_tokens
from tpu_reason.data.sources import Record

SCHEMA = tags.get_schema("reasoning")


def _rec(prompt: str, reasoning: str = "3 * 4 = 12, so 12.", answer: str = "12", checkpoints=("3 * 4 = 12",)):
  return Record(f"id-{prompt[:20]}", prompt, reasoning, answer, tuple(checkpoints), "math")


LONG = ("A farmer has 3 fields and plants 4 rows of corn in each field; every row gives 25 cobs and"
        " he sells each cob for 2 dollars at the market on Saturday. How much money does he make?")


def test_question_tokens_ignore_case_spacing_and_punctuation_but_keep_math():
  assert question_tokens("What is 2+2?") == question_tokens("  what IS 2 + 2 ")
  assert question_tokens("What is 2+2?") == ("what", "is", "2", "+", "2")
  assert question_tokens("2-2") != question_tokens("2+2")
  assert question_tokens("ﬁve") == ("five",)  # NFKC folds the ligature


def test_shingles_and_jaccard():
  assert quality.shingles(("a", "b")) == {"a b"}
  assert quality.shingles(("a", "b", "c", "d")) == {"a b c", "b c d"}
  assert quality.jaccard(frozenset("ab"), frozenset("bc")) == pytest.approx(1 / 3)


def test_each_malformed_row_gets_its_first_reason():
  rows = [
    _rec("q1"),  # fine
    _rec("q2", answer="."),  # normalises to nothing
    _rec("q3", reasoning="", checkpoints=()),  # no trace: kept unless require_trace
    _rec("q4", reasoning="we write <answer> early"),  # stray tag: the target would not parse back
    _rec("q5", reasoning="three fours are twelve"),  # lacks its own checkpoint
    _rec("q6", reasoning="", answer="."),  # three defects: the first check names it
    _rec("q6b", reasoning=""),  # an empty trace cannot hold its checkpoints
    _rec("q7", checkpoints=()),  # nothing to check
  ]
  assert quality.verdicts(rows, SCHEMA) == [
    None, "no_answer", None, "unparsable_trace", "missing_checkpoints", "no_answer", "missing_checkpoints", None]
  strict = quality.verdicts(rows, SCHEMA, require_trace=True)
  assert strict == [
    None, "no_answer", "no_trace", "unparsable_trace", "missing_checkpoints", "no_answer", "no_trace", None]


def test_trace_must_parse_in_the_training_schema_and_the_output_tags():
  think = tags.get_schema("think")
  in_think = _rec("q1", reasoning="I think </think> is done", checkpoints=())
  in_output = _rec("q2", reasoning="I close </reasoning> early", checkpoints=())
  assert quality.verdicts([in_think, in_output], think) == ["unparsable_trace", "unparsable_trace"]
  assert quality.verdicts([in_think, in_output], SCHEMA) == [None, "unparsable_trace"]


def test_exact_and_near_duplicates_keep_the_first_row():
  near = LONG.replace("Saturday", "Sunday")  # one word in 40: Jaccard of 3-shingles ~0.86
  far = LONG.replace("3 fields", "7 fields").replace("4 rows", "9 rows").replace("25 cobs", "31 cobs")
  rows = [_rec(LONG), _rec(LONG.upper()), _rec(near), _rec(far), _rec("What is 2+2?"), _rec("what is 2 + 2")]
  a, b = quality.shingles(question_tokens(LONG)), quality.shingles(question_tokens(near))
  assert 0.8 <= quality.jaccard(a, b) < 0.9
  assert quality.verdicts(rows, SCHEMA) == [None, "duplicate", "near_duplicate", None, None, "duplicate"]
  # the threshold is the knob: above this pair's similarity both are kept
  assert quality.verdicts(rows, SCHEMA, near_dup_threshold=0.95) == [None, "duplicate", None, None, None, "duplicate"]


def test_a_dropped_row_is_not_remembered_as_seen():
  # the first copy is malformed, so the second (well formed) copy is the one kept
  rows = [_rec(LONG, answer="."), _rec(LONG), _rec(LONG)]
  assert quality.verdicts(rows, SCHEMA) == ["no_answer", None, "duplicate"]
