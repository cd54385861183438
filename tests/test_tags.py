"""Tag schemas: render -> parse round trips, malformed text, hostile inputs."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpu_reason.tags import SCHEMAS, Parsed, get_schema, last_boxed

REASONING, THINK, S1 = SCHEMAS["reasoning"], SCHEMAS["think"], SCHEMAS["s1"]

FRAGMENTS = [
    "<reasoning>", "</reasoning>", "<answer>", "</answer>", "<think>", "</think>",
    "<|think|>", "<|answer|>", "**Final Answer:**", "Answer:", "\\boxed{", "{", "}",
    "<", ">", "/", "\n", " ", "3", "-1/2", "x", "é", "\u2028",
]
tag_soup = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)


def free_text(schema, single_line=False):
  """Text with none of the schema's markers (so it cannot change the structure)."""
  text = st.text(st.characters(exclude_characters="\n" if single_line else ""), max_size=60)
  return text.filter(lambda s: not any(m in s for m in schema.markers) and "Final Answer" not in s)


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_render_starts_with_primer_and_round_trips(name):
  schema = get_schema(name)
  text = schema.render_target("4 * 2 = 8\n8 + 9 = 17", "3")
  assert text.startswith(schema.primer)
  expected = Parsed("4 * 2 = 8\n8 + 9 = 17", "3", True, True)
  assert schema.parse(text) == expected
  assert schema.parse(text[len(schema.primer):]) == expected  # primer lives in the prompt


def test_rendered_layouts():
  assert REASONING.render_target("r", "3") == "<reasoning>\nr\n</reasoning>\n<answer>\n3\n</answer>"
  assert THINK.render_target("r", "3") == "<think>\nr\n</think>\n\n**Final Answer:** 3"
  assert S1.render_target("r", "3") == "<|think|>\nr\n<|answer|>\nAnswer: 3"
  assert REASONING.stop_strings == ("</answer>",) and THINK.stop_strings == S1.stop_strings == ()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_round_trip_property(name, data):
  schema = get_schema(name)
  reasoning = data.draw(free_text(schema))
  answer = data.draw(free_text(schema, single_line=name == "think").filter(lambda s: s.strip()))
  text = schema.render_target(reasoning, answer)
  expected = Parsed(reasoning.strip(), answer.strip(), True, True)
  assert schema.parse(text) == expected
  assert schema.parse(text[len(schema.primer):]) == expected


# ------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", Parsed(None, None, False, False)),
        ("just some words", Parsed(None, None, False, False)),
        ("<reasoning>\n", Parsed("", None, False, False)),
        # Missing close: the block runs up to the answer, which is still read.
        ("<reasoning>a <answer>3</answer>", Parsed("a", "3", False, False)),
        ("<reasoning>a</reasoning><answer>3</answer><answer>4</answer>", Parsed("a", "3", False, True)),
        ("<reasoning>a</reasoning>\n<answer>3</answer> and more", Parsed("a", "3", False, True)),
        ("<reasoning><reasoning>a</reasoning></reasoning><answer>3</answer>",
         Parsed("<reasoning>a", "3", False, True)),
        # Reversed: an answer before the reasoning does not count.
        ("<answer>3</answer><reasoning>a</reasoning>", Parsed("a", None, False, True)),
        ("<reasoning>a</reasoning><answer>3", Parsed("a", "3", False, True)),  # stop string stripped
        ("<reasoning>a</reasoning><answer> </answer>", Parsed("a", None, False, True)),
        ("<answer>3</answer>", Parsed(None, "3", False, False)),
        ("preamble <reasoning>a</reasoning><answer>3</answer>", Parsed("a", "3", False, True)),
        ("<reasoning>a</reasoning> b <answer>3</answer>", Parsed("a", "3", False, True)),
        ("<reasoning>a</reasoning><answer>3 </reasoning></answer>",
         Parsed("a", "3 </reasoning>", False, True)),
        ("  <reasoning>a</reasoning><answer>3</answer>\n\n", Parsed("a", "3", True, True)),
    ],
)
def test_reasoning_schema_malformed(text, expected):
  assert REASONING.parse(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think>\n\n**Final Answer:** 42", Parsed("a", "42", True, True)),
        ("<think>a</think>\n**Final Answer**: *5*", Parsed("a", "*5*", True, True)),
        ("<think>a</think>\nFinal Answer:\n\n7\n", Parsed("a", "7", True, True)),
        ("<think>a</think>\nso \\boxed{\\frac{1}{2}} it is", Parsed("a", "\\frac{1}{2}", True, True)),
        ("<think>a</think>\nFinal Answer: 1 \\boxed{2}", Parsed("a", "1 \\boxed{2}", True, True)),
        ("<think>a</think>\nfirst\nThe answer is 5\n\n", Parsed("a", "The answer is 5", True, True)),
        ("a</think>\n**Final Answer:** 3", Parsed("a", "3", True, True)),  # template opened <think>
        ("<think>a\n**Final Answer:** 3", Parsed("a\n**Final Answer:** 3", None, False, False)),
        ("<think>a</think>\n \n", Parsed("a", None, False, True)),
        ("<think>a</think>\nwork\n**Final Answer:**\n", Parsed("a", None, False, True)),
        # Unbalanced \boxed in 100 KB: bounded scan, then the last line is the answer.
        ("<think>a</think>\n\\boxed{" + "{" * 100_000,
         Parsed("a", "\\boxed{" + "{" * 100_000, True, True)),
        ("<think>a</think>3</think>", Parsed("a", "3</think>", False, True)),
        ("<think><think>a</think></think>\n3", Parsed("<think>a", "3", False, True)),
        ("**Final Answer:** 3\n<think>a</think>", Parsed("a", None, False, True)),
    ],
)
def test_think_schema(text, expected):
  assert THINK.parse(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<|think|>\na\n<|answer|>\nAnswer: 42", Parsed("a", "42", True, True)),
        ("<|think|>\na\n<|answer|>\n42 apples", Parsed("a", "42 apples", True, True)),
        ("<|think|>\na\n<|answer|>\nAnswer:", Parsed("a", None, False, True)),
        ("<|think|>\na\n", Parsed("a", None, False, False)),
        ("<|think|>a<|answer|>1<|answer|>2", Parsed("a", "1<|answer|>2", False, True)),
        ("<|answer|>3<|think|>a", Parsed("a", None, False, False)),
    ],
)
def test_s1_schema(text, expected):
  assert S1.parse(text) == expected


def test_last_boxed():
  assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
  assert last_boxed("\\boxed{unbalanced") is None
  assert last_boxed("no box") is None


def test_get_schema_unknown_lists_valid_names():
  with pytest.raises(ValueError, match="reasoning, s1, think"):
    get_schema("xml")


# ------------------------------------------------------------ redaction


@pytest.mark.parametrize(
    "schema, text, expected",
    [
        (REASONING, "<reasoning>\nsecret plan\n</reasoning>\n<answer>\n42\n</answer>",
         "<reasoning>[11 chars of reasoning redacted]</reasoning>\n<answer>\n42\n</answer>"),
        (REASONING, "secret</reasoning><answer>4</answer>",  # primer in the prompt
         "[6 chars of reasoning redacted]</reasoning><answer>4</answer>"),
        (REASONING, "<reasoning>never closed", "<reasoning>[12 chars of reasoning redacted]"),
        (REASONING, "no tags at all <answer>4</answer>", "[14 chars of reasoning redacted]<answer>4</answer>"),
        (THINK, "<think>abc</think>\n\n**Final Answer:** 5", "<think>[3 chars of reasoning redacted]</think>\n\n**Final Answer:** 5"),
        (S1, "<|think|>\nab\n<|answer|>\nAnswer: 7", "<|think|>[2 chars of reasoning redacted]<|answer|>\nAnswer: 7"),
        (THINK, "untagged musing", "[15 chars of reasoning redacted]"),
    ],
)
def test_redact_replaces_reasoning_by_its_length(schema, text, expected):
  assert schema.redact(text) == expected


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), tag_soup))
def test_redact_keeps_answer_and_closure(name, text):
  schema = get_schema(name)
  before, after = schema.parse(text), schema.parse(schema.redact(text))
  assert (after.answer, after.closed_reasoning) == (before.answer, before.closed_reasoning)
  expected = None if before.reasoning is None else f"[{len(before.reasoning)} chars of reasoning redacted]"
  assert after.reasoning == expected


# ------------------------------------------------------------ hostile input


def _check(parsed):
  assert isinstance(parsed, Parsed)
  if parsed.well_formed:
    assert parsed.closed_reasoning and parsed.reasoning is not None and parsed.answer is not None


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=2000, deadline=None)
@given(text=st.one_of(st.text(), tag_soup))
@pytest.mark.slow
def test_parse_never_raises(name, text):
  _check(get_schema(name).parse(text))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_parse_huge_inputs(name):
  schema = get_schema(name)
  for text in [
      "<reasoning>" * 10000,
      "<answer>" * 10000,
      "</think>" * 10000 + "\\boxed{" * 10000,
      "<|think|>" * 5000 + "<|answer|>" * 5000,
      "1," * 50000,
      "<reasoning><answer>" * 5000 + "</answer></reasoning>" * 5000,
      "\U0001f600\u0000\ud800" * 30000,
      "x" * 1_000_000,
  ]:
    _check(schema.parse(text))
