"""Rewards: exact values on hand cases, bounds and robustness on any text."""

import signal
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpu_reason import rewards
from tpu_reason.rewards import (
    REWARDS,
    answers_match,
    checkpoint_fraction,
    format_reward,
    format_reward_soft,
    make_rewards,
    normalize_answer,
    normalize_step,
    outcome_reward,
    process_reward,
    score,
)
from tpu_reason.tags import SCHEMAS

# A math_verify deadline (SIGALRM) can land in hypothesis' gc callback, where Python
# reports and drops it; rewards re-fires it (test_math_verify_deadline_survives_...).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

PROMPT = (
    "A store sells apples for $2 and oranges for $3. If I buy 4 apples and 3 oranges, "
    "and pay with a $20 bill, how much change do I get?"
)
CHECKPOINTS = ["4 * 2 = 8", "3 * 3 = 9", "8 + 9 = 17", "20 - 17"]


def completion(reasoning, answer="3"):
  return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"


def one(fn, text, **columns):
  """Reward of a single row."""
  (value,) = fn([PROMPT], [text], **{k: [v] for k, v in columns.items()})
  return value


# ------------------------------------------------------------ the example row


def test_example_row_all_rewards():
  text = completion("Apples: 4 × $2 = $8. Oranges: 3 x 3 = 9. Total: 8 + 9 = 17. Change: 20 - 17 = 3.")
  assert one(format_reward, text) == 1.0
  assert one(format_reward_soft, text) == 1.0
  assert one(process_reward, text, checkpoints=CHECKPOINTS) == 1.0
  assert one(outcome_reward, text, answer="3") == 1.0


def test_example_row_three_of_four_checkpoints():
  text = completion("Apples 4 * 2 = 8, oranges 3 * 3 = 9, together 17.\n20 - 17 = 3")
  assert one(process_reward, text, checkpoints=CHECKPOINTS) == 0.75
  assert one(outcome_reward, text, answer="3") == 1.0


def test_example_row_arithmetic_slip():
  text = completion("4 * 2 = 8\n3 * 3 = 9\n8 + 9 = 18\n20 - 18 = 2", answer="2")
  assert one(process_reward, text, checkpoints=CHECKPOINTS) == 0.5
  assert one(outcome_reward, text, answer="3") == 0.0
  assert one(format_reward, text) == 1.0


# ------------------------------------------------------------ format


@pytest.mark.parametrize(
    "text, strict, soft",
    [
        (completion("r"), 1.0, 1.0),
        ("  " + completion("r") + "\n\n", 1.0, 1.0),
        (completion("r") + " trailing", 0.75, 1.0),
        (completion("r") + "<answer>4</answer>", 0.75, 1.0),
        ("chatter " + completion("r"), 0.75, 1.0),
        ("<reasoning>r</reasoning><answer>3", 0.75, 1.0),  # stop string stripped by the sampler
        ("<reasoning>r</reasoning>\n<answer>\n</answer>", 0.5, 0.0),
        ("<reasoning>r</reasoning>", 0.5, 0.0),
        ("<reasoning>r <answer>3</answer>", 0.5, 0.0),
        ("<answer>3</answer><reasoning>r</reasoning>", 0.5, 0.0),
        ("<reasoning>\n", 0.25, 0.0),
        ("<answer>3</answer>", 0.25, 0.0),
        ("The answer is 3.", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_format_rewards(text, strict, soft):
  assert one(format_reward, text) == strict
  assert one(format_reward_soft, text) == soft


def test_format_other_schemas():
  think = ["<think>\nr\n</think>\n\n**Final Answer:** 3", "<think>\nr", "r</think>\n3"]
  assert format_reward([""] * 3, think, schema="think") == [1.0, 0.25, 1.0]
  s1 = ["<|think|>\nr\n<|answer|>\nAnswer: 3", "<|think|>\nr\n<|answer|>\n"]
  assert format_reward(["", ""], s1, schema="s1") == [1.0, 0.5]
  # Per-row schema column, as TRL passes dataset columns.
  assert format_reward(["", ""], [think[0], s1[0]], schema=["think", "s1"]) == [1.0, 1.0]
  assert format_reward([""], [think[0]], schema=SCHEMAS["think"]) == [1.0]


# ------------------------------------------------------------ process


@pytest.mark.parametrize(
    "checkpoint, text",
    [
        ("4 * 2 = 8", "4*2=8"),  # spaces
        ("4 * 2 = 8", "4 × 2 = 8"),
        ("4 * 2 = 8", "4 x 2 = 8"),
        ("4 * 2 = 8", "4X2=8"),
        ("4 * 2 = 8", "4 · 2 = 8"),
        ("4 × 2 = 8", "4 * 2 = 8"),
        ("8 / 2 = 4", "8 ÷ 2 = 4"),
        ("1000 * 2 = 2000", "1,000 * 2 = 2,000"),
        ("4 * 2 = 8", "4.0 * 2.00 = 8.0"),
        ("4 * 2 = 8", "4 * $2 = $8"),
        ("20 - 23 = -3", "20 − 23 = −3"),
        ("Total = 17", "total=17"),
        ("20 - 17", "20 - 17 = 3"),  # no result in the checkpoint
        ("4 * 2 = 8", "So 4 * 2 = 8."),
        ("3 * 3 = 9", "4 * 2 = 8. 3 * 3 = 9. Then"),  # sentence periods are not decimals
    ],
)
def test_checkpoint_normalisation_matches(checkpoint, text):
  assert checkpoint_fraction(text, [checkpoint]) == 1.0


@pytest.mark.parametrize(
    "checkpoint, text",
    [
        ("3", "13"),
        ("3", "0.3"),
        ("8 + 9 = 17", "8 + 9 = 18"),
        ("8 + 9 = 17", "8 + 9 = 170"),
        ("8 + 9 = 17", "8 + 9 = 17.5"),
        ("8 + 9 = 17", "18 + 9 = 17"),
        ("20 - 17", "120 - 17 = 103"),
        ("4 * 2 = 8", "4 + 2 = 8"),
        ("1000", "1,0000"),
    ],
)
def test_checkpoint_near_misses_do_not_match(checkpoint, text):
  assert checkpoint_fraction(text, [checkpoint]) == 0.0


def test_normalize_step():
  assert normalize_step("  4 × $2,000.00 = $8,000 ") == "4*2000=8000"
  assert normalize_step("20 − 17 ÷ 1") == "20-17/1"


def test_process_edge_cases():
  text = completion("4 * 2 = 8")
  assert one(process_reward, "4 * 2 = 8 without tags", checkpoints=CHECKPOINTS) == 0.0
  assert one(process_reward, "<answer>4 * 2 = 8</answer>", checkpoints=CHECKPOINTS) == 0.0
  # without checkpoints the reward does not apply (None, as TRL allows), whatever the text
  assert one(process_reward, text, checkpoints=[]) is None
  assert one(process_reward, text, checkpoints=None) is None
  assert one(process_reward, text, checkpoints=["", "  "]) is None
  assert one(process_reward, "garbage", checkpoints=[]) is None
  assert one(process_reward, text, checkpoints=("4*2=8", None)) == 1.0  # tuples, None entries
  assert one(process_reward, text, checkpoints="4 * 2 = 8") == 1.0  # a bare string is one checkpoint
  assert process_reward([PROMPT], [text]) == [None]  # column missing
  # Only the reasoning block counts, and an unclosed block still counts.
  assert one(process_reward, completion("nothing", answer="4 * 2 = 8"), checkpoints=["4*2=8"]) == 0.0
  assert one(process_reward, "<reasoning>4 * 2 = 8 and then", checkpoints=["4*2=8", "1+1"]) == 0.5


# ------------------------------------------------------------ outcome


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("3", "3"),
        (" 3 \n", "3"),
        ("1,000", "1000"),
        ("1,234,567", "1234567"),
        ("3.0", "3"),
        ("3.00", "3"),
        ("3.50", "3.5"),
        ("-0", "0"),
        ("$18", "18"),
        ("\\$18", "18"),
        ("18 dollars", "18"),
        ("3 apples", "3"),
        ("50%", "50"),
        ("50\\%", "50"),
        ("three", "3"),
        ("Ten", "10"),
        ("zero", "0"),
        ("\\boxed{3}", "3"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("3.", "3"),
        ("−5", "-5"),
        ("**5**", "5"),
        ("The answer is 5", "5"),
        ("Answer: 5", "5"),
        ("5 \\text{ dollars}", "5"),
        ("YES", "yes"),
        # Symbolic, via math_verify.
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac12", "1/2"),
        ("x + 1", "1 + x"),
        ("2^{10}", "1024"),
        ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"),
        ("1.5\\times10^3", "1500"),
        # Forms math_verify misreads, settled by the normaliser.
        ("1e3", "1000"),
        ("1.5e3", "1500"),
        ("2.5E-1", "0.25"),
        ("\\infty", "inf"),
        ("∞", "\\infty"),
        ("-\\infty", "-inf"),
        ("1 000", "1000"),
        ("1 234 567.5", "1234567.5"),
    ],
)
def test_answers_match(pred, gold):
  assert answers_match(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("13", "3"),
        ("3", "13"),
        ("31", "3"),
        ("-3", "3"),
        ("0.3", "3"),
        ("3x", "3"),
        ("3 or 4", "3"),
        ("0.33", "1/3"),
        ("10%", "0.1"),  # percents compare as their number, like GSM8K golds
        ("eleven", "11"),  # number words stop at ten
        ("", "3"),
        ("3", ""),
        (None, "3"),
        ("3", None),
        ("answers", "3"),
        ("1" * 2000, "1" * 1999),  # long: no math_verify, still different
        ("1e3", "100"),
        ("-\\infty", "inf"),
        ("3 4", "34"),  # not thousands: math_verify alone would read 4
        ("1000 0", "10000"),
    ],
)
def test_answers_do_not_match(pred, gold):
  assert not answers_match(pred, gold)


def test_normalize_answer():
  assert normalize_answer(" \\boxed{$1,000.00} dollars. ") == "1000"
  assert normalize_answer("Five apples") == "5"
  assert normalize_answer("+007.50") == "7.5"
  assert normalize_answer(None) == ""
  assert normalize_answer("3 x") == "3 x"  # one letter may be a variable, not a unit


def test_outcome_reward_rows():
  texts = [completion("r", "3"), completion("r", "$3.00"), completion("r", "4"), "no tags 3"]
  texts.append(texts[0])
  golds = ["3", "3", "3", "3", None]
  assert outcome_reward([PROMPT] * 5, texts, answer=golds) == [1.0, 1.0, 0.0, 0.0, 0.0]
  assert outcome_reward([PROMPT], [texts[0]]) == [0.0]  # no answer column
  assert outcome_reward([PROMPT], [texts[0]], answer=[3]) == [1.0]  # non-string gold


def test_outcome_other_schemas():
  think = ["<think>\nr\n</think>\n\n**Final Answer:** \\boxed{3}", "<think>\nr\n</think>\nso it is 3"]
  assert outcome_reward(["", ""], think, answer=["3", "3"], schema="think") == [1.0, 0.0]
  s1 = ["<|think|>\nr\n<|answer|>\nAnswer: 1/2"]
  assert outcome_reward([""], s1, answer=["0.5"], schema="s1") == [1.0]


def test_answers_match_off_main_thread():
  # math_verify's own timeout uses SIGALRM, which raises off the main thread; we never use it.
  results = []
  pairs = [("1/2", "0.5"), ("9^9^9^9", "1"), ("(" * 40 + "1" + ")" * 40, "2")]
  worker = threading.Thread(target=lambda: results.extend(answers_match(p, g) for p, g in pairs))
  worker.start()
  worker.join()
  assert results == [True, False, False]


def test_math_verify_is_bounded_and_leaves_signals_alone():
  before = signal.getsignal(signal.SIGALRM)
  assert not answers_match("9^9^9^9^9", "2")
  assert not answers_match("(" * 40 + "1" + ")" * 40, "2")
  assert signal.getsignal(signal.SIGALRM) is before
  assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# ------------------------------------------------------------ registry, score


def test_score_weights_and_components():
  texts = [completion("4 * 2 = 8", "3"), "garbage"]
  totals, parts = score(
      [PROMPT] * 2, texts, {"format": 0.5, "outcome": 2.0, "process": 1.0},
      answer=["3", "3"], checkpoints=[CHECKPOINTS, CHECKPOINTS], id=["a", "b"],
  )
  assert parts == {"format": [1.0, 0.0], "outcome": [1.0, 0.0], "process": [0.25, 0.0]}
  assert totals == [0.5 + 2.0 + 0.25, 0.0]
  with pytest.raises(ValueError, match="format_soft"):
    score([PROMPT], texts[:1], {"fromat": 1.0})


def test_score_leaves_out_rewards_that_do_not_apply():
  # row b has no checkpoints: its total is format + outcome alone, not a process 0 on top
  texts = [completion("4 * 2 = 8", "3"), completion("4 * 2 = 8", "3")]
  totals, parts = score([PROMPT] * 2, texts, {"format": 1.0, "process": 2.0, "outcome": 1.0},
                        answer=["3", "3"], checkpoints=[CHECKPOINTS, []])
  assert parts["process"] == [0.25, None]
  assert totals == [1.0 + 2.0 * 0.25 + 1.0, 1.0 + 1.0]


def test_registry_and_factory():
  assert set(REWARDS) == {"format", "format_soft", "process", "outcome"}
  bound = make_rewards("think")
  assert bound["format"].__name__ == "format_reward"
  assert bound["format"]([""], ["<think>r</think>\n3"]) == [1.0]
  with pytest.raises(ValueError):
    make_rewards("nope")


def test_conversational_completions_and_extra_kwargs():
  messages = [{"role": "assistant", "content": completion("r", "3")}]
  assert outcome_reward([PROMPT], [messages], answer=["3"], trainer_state=object()) == [1.0]
  assert format_reward([PROMPT], [None]) == [0.0]


# ------------------------------------------------------------ never raise, stay in [0, 1]

FRAGMENTS = [
    "<reasoning>", "</reasoning>", "<answer>", "</answer>", "<think>", "</think>", "\n", " ",
    "4 * 2 = 8", "3 × 3 = 9", "8+9=17", "20 - 17", "1,000", "3", "3.0", "$", "−", "\\boxed{", "}",
    "1/2", "\\frac{1}{2}", "x", "three", "**Final Answer:**", "<|answer|>", "é", "\u2028",
]
tag_soup = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)
texts = st.one_of(st.text(max_size=200), tag_soup)
golds = st.one_of(
    st.none(), st.sampled_from(["3", "17", "0.5", "\\frac{1}{2}", "1,000", "x+1", ""]), st.text(max_size=20)
)
checkpoint = st.one_of(st.sampled_from(CHECKPOINTS), st.text(max_size=20))
checkpoint_lists = st.one_of(st.none(), st.lists(checkpoint, max_size=5))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REWARDS))
@settings(max_examples=2000, deadline=None)
@given(text=texts, gold=golds, checkpoints=checkpoint_lists, schema=st.sampled_from(sorted(SCHEMAS)))
def test_rewards_bounded_on_any_text(name, text, gold, checkpoints, schema):
  (value,) = REWARDS[name]([PROMPT], [text], answer=[gold], checkpoints=[checkpoints], schema=schema)
  if name == "process" and not any(normalize_step(str(c)) for c in checkpoints or []):
    assert value is None  # no checkpoints: process does not apply
  else:
    assert isinstance(value, float) and 0.0 <= value <= 1.0


@settings(max_examples=2000, deadline=None)
@given(pred=texts, gold=golds)
@pytest.mark.slow
def test_answers_match_is_total(pred, gold):
  assert answers_match(pred, gold) in (True, False)
  assert isinstance(normalize_answer(pred), str)


ADVERSARIAL = {
    "reasoning_open_x10k": "<reasoning>" * 10000,
    "answer_open_x10k": "<answer>" * 10000,
    "one_comma_x50k": "1," * 50000,
    "nested_tags": "<reasoning><answer>" * 2500 + "</answer></reasoning>" * 2500,
    "huge_answer": "<reasoning>x</reasoning><answer>" + "1," * 50000 + "</answer>",
    "huge_boxed": "<think>a</think>" + "\\boxed{" * 14000 + "}" * 14000,
    "boxed_unclosed": "<think>a</think>\\boxed{" + "{" * 100_000,
    "digits": "<reasoning>" + "1" * 100_000 + "</reasoning><answer>" + "9" * 5000 + "</answer>",
    "unicode": "<reasoning>" + "\U0001f600×÷−" * 25000,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_100kb(name):
  text = ADVERSARIAL[name]
  for schema in SCHEMAS:
    _, parts = score(
        [PROMPT], [text], dict.fromkeys(REWARDS, 1.0),
        answer=["1" * 5000], checkpoints=[CHECKPOINTS + ["1", "1" * 50]], schema=schema,
    )
    assert all(0.0 <= v[0] <= 1.0 for v in parts.values())


def test_math_verify_skipped_for_long_answers(monkeypatch):
  monkeypatch.setattr(rewards, "_symbolic_equal", lambda *args: pytest.fail("math_verify called"))
  assert not answers_match("x" * 1001 + "1", "1/2")
