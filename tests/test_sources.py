"""Tests for tpu_reason.data.sources: every source normalised to Record."""

import dataclasses
import json
import os
import pathlib
import re

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported

import hypothesis
import hypothesis.strategies as st
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tpu_reason.data import sources
from tpu_reason.data.sources import DataError, Record

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True, scope="module")
def _hf_cache(tmp_path_factory):
  """Keeps datasets' arrow cache out of the home directory."""
  import datasets

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
    yield


def _accounted(report):
  return report.seen == report.kept + sum(report.dropped.values())


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


# ---------------------------------------------------------------- teacher


def test_teacher_extracts_fields():
  records, report = sources.load_teacher(FIXTURES / "teacher.jsonl")
  tom, code = records
  assert tom.prompt.startswith("Tom has $20.")
  assert tom.reasoning == "Pens cost 4 * 2 = 8. Notebooks cost 3 * 3 = 9. Together 8 + 9 = 17. Left: 20 - 17 = 3."
  assert tom.answer == "3"  # metadata.final_answer wins over "<answer>$3</answer>"
  assert tom.checkpoints == ("4 * 2 = 8", "3 * 3 = 9", "8 + 9 = 17", "20 - 17")
  assert tom.domain == "math"
  assert tom.id == sources.stable_id("teacher", tom.prompt)
  assert code == Record("t-2", "What does len('abc') return?", "len counts characters: a, b, c.", "3", (), "code")
  assert (report.seen, report.kept, report.dropped) == (2, 2, {})


def test_teacher_lenient_counts_every_bad_row():
  records, report = sources.load_teacher(FIXTURES / "teacher_bad.jsonl", strict=False)
  assert [r.answer for r in records] == ["2"]
  assert report.dropped == {
    "malformed_json": 1,
    "missing_field": 1,
    "wrong_type": 2,
    "empty_answer": 1,
    "no_reasoning_tag": 1,
  }
  assert report.seen == 7  # the blank line is not a row
  assert _accounted(report)


def test_teacher_strict_names_file_and_line():
  path = FIXTURES / "teacher_bad.jsonl"
  with pytest.raises(DataError, match=re.escape(f"{path}:2: malformed JSON")):
    sources.load_teacher(path)


GOOD_TEACHER = {"prompt": "p", "chosen": "<reasoning>r</reasoning><answer>1</answer>"}


@pytest.mark.parametrize(
  "bad, message",
  [
    ({"chosen": GOOD_TEACHER["chosen"]}, "missing field 'prompt'"),
    ({"prompt": ["p"], "chosen": GOOD_TEACHER["chosen"]}, "field 'prompt' should be str, got list"),
    ({"prompt": "p", "chosen": "<reasoning>r</reasoning>", "metadata": {"final_answer": ""}}, "empty answer"),
    ({**GOOD_TEACHER, "metadata": {"checkpoints": "1 + 1 = 2"}}, "field 'metadata.checkpoints' should be a list"),
    ({"prompt": "p", "chosen": "<reasoning>r</reasoning>"}, "missing field 'metadata.final_answer'"),
  ],
)
def test_teacher_strict_error_messages(tmp_path, bad, message):
  path = _write_jsonl(tmp_path / "data.jsonl", [GOOD_TEACHER] * 16 + [bad])
  with pytest.raises(DataError, match=re.escape(f"{path}:17: {message}")):
    sources.load_teacher(path)
  _, report = sources.load_teacher(path, strict=False)
  assert (report.seen, report.kept, sum(report.dropped.values())) == (17, 16, 1)


def test_data_error_is_value_error():
  assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------ gsm8k


def test_gsm8k_jsonl():
  records, report = sources.load_gsm8k(FIXTURES / "gsm8k.jsonl")
  natalia, weng, widgets = records
  assert natalia.reasoning == (
    "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
  )
  assert natalia.answer == "72"
  assert natalia.checkpoints == ("48/2=24", "48+24=72")
  assert natalia.domain == "math"
  assert weng.reasoning == "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10."
  assert weng.checkpoints == ("12/60=0.2", "0.2*50=10")
  assert widgets.answer == "5000"  # thousands separator removed
  assert report.dropped == {"no_delimiter": 1}  # filtered even when strict
  assert (report.seen, report.kept) == (4, 3)


def test_gsm8k_parquet_matches_jsonl(tmp_path):
  rows = [json.loads(line) for line in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]
  path = _write_parquet(tmp_path / "gsm8k.parquet", rows)
  from_parquet, report = sources.load_gsm8k(path)
  from_jsonl, _ = sources.load_gsm8k(FIXTURES / "gsm8k.jsonl")
  assert from_parquet == from_jsonl
  assert report.dropped == {"no_delimiter": 1}


def test_gsm8k_parquet_strict_error_names_row(tmp_path):
  rows = [{"question": "q", "answer": "1 + 1 = 2\n#### 2"}, {"question": None, "answer": "#### 3"}]
  path = _write_parquet(tmp_path / "gsm8k.parquet", rows)
  with pytest.raises(DataError, match=re.escape(f"{path}:row 2: missing field 'question'")):
    sources.load_gsm8k(path)


def test_gsm8k_empty_answer_after_delimiter(tmp_path):
  path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "work\n####  "}])
  with pytest.raises(DataError, match="g.jsonl:1: empty answer"):
    sources.load_gsm8k(path)
  assert sources.load_gsm8k(path, strict=False)[1].dropped == {"empty_answer": 1}


# -------------------------------------------------------------------- s1K


def test_s1k_raw_rows():
  (aime, boxed, proof), report = sources.load_s1k(FIXTURES / "s1k.jsonl")
  assert aime.answer == "128"
  assert aime.reasoning.startswith("Alright, so I need to figure out")
  assert aime.checkpoints == ()
  assert aime.domain == "math"
  assert boxed.answer == "\\frac{1}{2}"  # long LaTeX solution: \boxed{} content
  assert boxed.reasoning == "Let me pair the terms.\n\nEach pair gives 1/2."
  assert proof.answer == "Hence the final configuration is unreachable and the answer is no."  # last line
  assert proof.reasoning == "Check the parity invariant."  # str trajectory is accepted too
  assert proof.domain == "science"  # from cot_type
  assert (report.seen, report.kept, report.dropped) == (3, 3, {})


def test_s1k_tokenized_variants():
  (chosen, text), report = sources.load_s1k(FIXTURES / "s1k_tokenized.jsonl")
  assert chosen == Record(chosen.id, "What is 3 * 4?", "Three groups of four make 12.", "12", (), "math")
  assert (text.prompt, text.reasoning, text.answer) == ("What is 5 + 6?", "5 + 6 = 11.", "11")
  assert report.kept == 2


def test_s1k_chatml_prompt_is_unwrapped(tmp_path):
  row = {
    "prompt": "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "chosen": "<|im_start|>think\n1 + 2 = 3<|im_start|>answer\nAnswer: 3<|im_end|>",
  }
  (record,), _ = sources.load_s1k(_write_jsonl(tmp_path / "s.jsonl", [row]))
  assert (record.prompt, record.reasoning, record.answer) == ("What is 1 + 2?", "1 + 2 = 3", "3")


# ------------------------------------------------------------- dolphin-r1


def test_dolphin_r1():
  records, report = sources.load_dolphin_r1(FIXTURES / "dolphin_r1.jsonl")
  assert [(r.prompt, r.answer) for r in records] == [
    ("What is 2 + 3 * 4?", "14"),  # \boxed{}
    ("What is the capital of France?", "Paris"),  # **Final Answer:**
    ("Name the largest animal.", "The blue whale."),  # short whole answer
  ]
  assert records[0].reasoning == "Multiplication first: 3 * 4 = 12, then 2 + 12 = 14."
  assert records[0].domain == "general"
  assert report.dropped == {"no_short_answer": 1}  # the poem
  assert _accounted(report)


def test_dolphin_r1_needs_a_user_message(tmp_path):
  row = {"messages": [{"role": "system", "content": "s"}], "reasoning": "r", "answer": "1"}
  with pytest.raises(DataError, match="d.jsonl:1: missing field 'messages"):
    sources.load_dolphin_r1(_write_jsonl(tmp_path / "d.jsonl", [row]))


def test_dolphin_answer_rules():
  assert sources.dolphin_answer("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
  assert sources.dolphin_answer("long " * 20 + "\n**Final Answer:** 42\nThanks") == "42"
  assert sources.dolphin_answer("long " * 20) is None


# ---------------------------------------------------------- reasoning-gym


def test_reasoning_gym_gsm_symbolic():
  records, report = sources.load_reasoning_gym("gsm_symbolic", seed=42, size=20)
  assert report.kept + sum(report.dropped.values()) == 20 == report.seen
  assert records
  for r in records:
    assert r.answer and r.reasoning and r.domain == "gsm_symbolic"
    assert "####" not in r.reasoning
    assert len(r.checkpoints) >= 1
    assert all(c in r.reasoning for c in r.checkpoints)


def test_reasoning_gym_chain_sum():
  records, report = sources.load_reasoning_gym("chain_sum", seed=1, size=10)
  assert report.kept == 10
  assert all(r.answer and r.reasoning == "" and r.checkpoints == () and r.domain == "chain_sum" for r in records)


def test_reasoning_gym_filters_mismatched_cot(monkeypatch):
  import reasoning_gym

  def entry(cot, answer):
    return {"question": f"q {cot}", "answer": answer, "metadata": {"answer_cot": cot}}

  fake = [entry("3 * 4 = 12\n#### 12", "12"), entry("8 / 1 = 8\n#### 8.0", "8"), entry("1 + 1 = 2\n#### 2", "3")]
  monkeypatch.setattr(reasoning_gym, "create_dataset", lambda name, **kw: fake)
  records, report = sources.load_reasoning_gym("gsm_symbolic", seed=0, size=3)
  assert [r.checkpoints for r in records] == [("3 * 4 = 12",), ("8 / 1 = 8",)]  # "8.0" == "8"
  assert report.dropped == {"answer_mismatch": 1}


@pytest.mark.parametrize(
  "text, steps",
  [
    ("so 35 × 3 = 105 kiwi\nTotal: 105 + 35 = 140", ("35 × 3 = 105", "105 + 35 = 140")),
    ("fee is $400,000 x 8/100 = $32,000.", ("$400,000 x 8/100 = $32,000",)),
    ("he earns £195/day * 12 days/month = £2340/month", ("£195/day * 12 days/month = £2340",)),
    ("Then 12.5 ÷ 2.5 = 5 and 160-48=112", ("12.5 ÷ 2.5 = 5", "160-48=112")),
    ("we get 2x+140=198", ("2x+140=198",)),
    ("James receives 48=48 emails; Jennifer = 442 points", ()),
  ],
)
def test_arithmetic_steps(text, steps):
  assert sources.arithmetic_steps(text) == steps


# ---------------------------------------------------------- generic table


def test_table_parquet_with_column_mapping(tmp_path):
  rows = [
    {"problem": "What is 6 * 7?", "final": "42", "trace": "6 * 7 = 42", "steps": ["6 * 7 = 42"], "uid": "a"},
    {"problem": "What is 1 + 1?", "final": None, "trace": "", "steps": [], "uid": "b"},
  ]
  path = _write_parquet(tmp_path / "t.parquet", rows)
  columns = {"problem": "prompt", "final": "answer", "trace": "reasoning", "steps": "checkpoints", "uid": "id"}
  records, report = sources.load_table(path, columns=columns, domain="arith", strict=False)
  assert records == [Record("a", "What is 6 * 7?", "6 * 7 = 42", "42", ("6 * 7 = 42",), "arith")]
  assert report.dropped == {"missing_field": 1}


def test_table_jsonl_glob_goes_through_datasets(tmp_path):
  for i in range(2):
    _write_jsonl(tmp_path / f"part{i}.jsonl", [{"question": f"q{i}", "answer": i}])
  records, report = sources.load_table(str(tmp_path / "part*.jsonl"))
  assert sorted((r.prompt, r.answer, r.reasoning) for r in records) == [("q0", "0", ""), ("q1", "1", "")]
  assert report.kept == 2


def test_table_rows_may_name_the_prompt_question_or_prompt(tmp_path):
  path = _write_jsonl(tmp_path / "t.jsonl", [{"question": "q1", "answer": 1}, {"prompt": "q2", "answer": "2"},
                                             {"answer": "3"}])
  records, report = sources.load_table(path, strict=False)
  assert [(r.prompt, r.answer) for r in records] == [("q1", "1"), ("q2", "2")]
  assert report.dropped == {"missing_field": 1}
  with pytest.raises(DataError, match=re.escape(f"{path}:3: missing field 'question'")):
    sources.load_table(path)


def test_table_rejects_unknown_field():
  with pytest.raises(ValueError, match="unknown Record field 'solution'"):
    sources.load_table(FIXTURES / "gsm8k.jsonl", columns={"answer": "solution"})


# ------------------------------------------------------------- dispatcher


def test_load_source_dispatch():
  by_dict = sources.load_source({"kind": "gsm8k", "path": str(FIXTURES / "gsm8k.jsonl"), "split": None})
  by_kwargs = sources.load_source(kind="gsm8k", path=FIXTURES / "gsm8k.jsonl")

  @dataclasses.dataclass
  class SourceConfig:
    kind: str
    path: str | None = None
    name: str | None = None
    seed: int | None = None
    size: int | None = None

  by_config = sources.load_source(SourceConfig("reasoning_gym", name="chain_sum", seed=0, size=3))
  assert by_dict[0] == by_kwargs[0] and len(by_dict[0]) == 3
  assert by_config[1].kept == 3
  with pytest.raises(ValueError, match="unknown source kind"):
    sources.load_source({"kind": "nope"})
  with pytest.raises(TypeError, match="does not take"):
    sources.load_source(kind="teacher", path="x.jsonl", seed=3)


# -------------------------------------------------------------- round trip


def test_teacher_round_trip(tmp_path):
  originals = [
    *sources.load_teacher(FIXTURES / "teacher.jsonl")[0],
    *sources.load_gsm8k(FIXTURES / "gsm8k.jsonl")[0],
    *sources.load_dolphin_r1(FIXTURES / "dolphin_r1.jsonl")[0],
    *sources.load_reasoning_gym("gsm_symbolic", seed=3, size=5)[0],
    *sources.load_reasoning_gym("leg_counting", seed=3, size=2)[0],  # empty reasoning
  ]
  path = tmp_path / "sample" / "teacher.jsonl"
  assert sources.records_to_teacher_jsonl(originals, path) == len(originals)
  row = json.loads(path.read_text().splitlines()[0])
  assert set(row) == {"id", "domain", "prompt", "chosen", "metadata"}
  assert set(row["metadata"]) == {"checkpoints", "final_answer"}
  reloaded, report = sources.load_teacher(path)
  assert reloaded == originals
  assert report.kept == len(originals)


_text = st.text(min_size=1, max_size=40).map(str.strip).filter(bool)


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
  prompt=_text,
  reasoning=st.text(max_size=60).map(str.strip),
  answer=_text,
  checkpoints=st.lists(st.text(max_size=10), max_size=3).map(tuple),
)
def test_teacher_round_trip_property(tmp_path_factory, prompt, reasoning, answer, checkpoints):
  hypothesis.assume("</reasoning>" not in reasoning and "</answer>" not in answer)
  record = Record("id-1", prompt, reasoning, answer, checkpoints, "math")
  path = tmp_path_factory.mktemp("rt") / "t.jsonl"
  sources.records_to_teacher_jsonl([record], path)
  assert sources.load_teacher(path)[0] == [record]


def test_writer_refuses_text_that_cannot_round_trip(tmp_path):
  record = Record("x", "p", "a </reasoning> b", "1", (), "math")
  with pytest.raises(ValueError, match="closing tag"):
    sources.records_to_teacher_jsonl([record], tmp_path / "t.jsonl")
