"""Tag schemas: how reasoning and the final answer are laid out in assistant text.

Three schemas, each rendered by `TagSchema.render_target` and read back by
`TagSchema.parse`:

  reasoning (default)
      <reasoning>\\n...\\n</reasoning>\\n<answer>\\n42\\n</answer>
      primer "<reasoning>\\n", generation stops at "</answer>".
  think (DeepSeek-R1 / Qwen3 style)
      <think>\\n...\\n</think>\\n\\n**Final Answer:** 42
      primer "<think>\\n", generation stops at EOS only. The parser takes the
      "Final Answer" value if present, else the last \\boxed{...}, else the last
      non-empty line after </think>.
  s1 (s1-style section markers, without reusing the chat template's <|im_start|>)
      <|think|>\\n...\\n<|answer|>\\nAnswer: 42
      primer "<|think|>\\n", stops at EOS only. The reasoning block is closed by
      the answer marker; the answer is everything after it, minus an optional
      "Answer:" prefix.

The tag fields hold bare markers ("<reasoning>"); newlines around them are
layout, added by `render_target` and ignored by `parse`.

Parsing uses str.find, slicing and bounded scans, so it is linear in the text
length and cannot raise on any str. Rules shared by all schemas:
  * The first reasoning-open marker starts the block. If there is none but a
    reasoning-close marker exists, the block is taken to start at the top of the
    text: the primer was part of the prompt (e.g. generated text alone).
  * The block ends at the first close marker after it; an unclosed block runs to
    the first answer tag (or the end of the text).
  * Only an answer *after* the reasoning block counts; with answer tags the first
    <answer> block wins and an unclosed one runs to the end of the text
    (samplers may strip the stop string). Empty answers are None.
  * well_formed: only whitespace before the reasoning block, exactly one closed
    block, a non-empty answer, no stray markers anywhere, and (with answer tags)
    a closed answer block with only whitespace between and after the blocks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from tpu_reason import choices
from tpu_reason.errors import UserError

_FINAL_ANSWER_PUNCT = re.compile(r"\*{0,2}:?\*{0,2}")
_MAX_BOXED_CHARS = 10_000


@dataclasses.dataclass(frozen=True)
class Parsed:
  """What `TagSchema.parse` found in one assistant text."""

  reasoning: str | None  # text inside the reasoning block (None if no block opened)
  answer: str | None  # final answer text (None if not found or empty)
  well_formed: bool  # exactly one closed reasoning block, then one answer, nothing after
  closed_reasoning: bool  # the reasoning block was closed (False = never stopped thinking)


def _strip_or_none(s: str) -> str | None:
  """Strips `s`; None when nothing is left."""
  s = s.strip()
  return s or None


def _first_line(s: str) -> str:
  """First line of the stripped text (only "\\n" ends a line)."""
  return s.strip().split("\n", 1)[0]


def last_boxed(text: str) -> str | None:
  """Contents of the last \\boxed{...} in `text`, braces balanced; None if absent."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  start += len("\\boxed{")
  depth = 1
  # Bounded scan: a boxed "answer" longer than this is not one, and 1 MB stays cheap.
  for i in range(start, min(len(text), start + _MAX_BOXED_CHARS)):
    c = text[i]
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[start:i]
  return None


def _final_answer_tail(tail: str) -> str | None:
  """Answer after </think>: "Final Answer" value, else last \\boxed{}, else last line."""
  pos = tail.rfind("Final Answer")
  if pos >= 0:
    rest = tail[pos + len("Final Answer"):]
    # Accept "**Final Answer:**", "**Final Answer**:" and "Final Answer:".
    rest = rest[_FINAL_ANSWER_PUNCT.match(rest).end():]
    value = _strip_or_none(_first_line(rest))
    if value is not None:
      return value
  boxed = _strip_or_none(last_boxed(tail) or "")
  if boxed is not None or pos >= 0:
    return boxed  # an empty "Final Answer:" line is not itself the answer
  return _strip_or_none(tail.strip().rsplit("\n", 1)[-1])


def _prefixed_tail(tail: str) -> str | None:
  """Answer after the s1 answer marker, minus one optional "Answer:" prefix."""
  tail = tail.strip()
  if tail.startswith("Answer:"):
    tail = tail[len("Answer:"):]
  return _strip_or_none(tail)


@dataclasses.dataclass(frozen=True)
class TagSchema:
  """One way of laying out reasoning then answer in the assistant turn."""

  name: str
  reasoning_open: str
  reasoning_close: str
  answer_open: str | None  # None: the answer is free text after reasoning_close
  answer_close: str | None
  primer: str  # appended to the prompt after the assistant turn opens
  stop_strings: tuple[str, ...]  # strings that end generation (besides EOS)
  answer_prefix: str = ""  # rendered before the answer when there are no answer tags
  tail_answer: Callable[[str], str | None] | None = None  # reads the answer from free text

  @property
  def markers(self) -> tuple[str, ...]:
    """All tag strings of this schema."""
    tags = (self.reasoning_open, self.reasoning_close, self.answer_open, self.answer_close)
    return tuple(t for t in tags if t)

  @property
  def answer_start(self) -> str:
    """Text between the reasoning and the answer: closes one, opens the other (a thinking cap forces it)."""
    if self.answer_open is not None:
      return f"\n{self.reasoning_close}\n{self.answer_open}\n"
    return f"\n{self.reasoning_close}\n{self.answer_prefix}"

  def render_target(self, reasoning: str, answer: str) -> str:
    """Full assistant text for SFT targets; starts with `primer`."""
    text = f"{self.primer}{reasoning.strip()}{self.answer_start}{answer.strip()}"
    return text if self.answer_close is None else f"{text}\n{self.answer_close}"

  def _has_marker(self, s: str) -> bool:
    return any(m in s for m in self.markers)

  def _block(self, text: str) -> tuple[int, int, int, bool] | None:
    """(start, body start, body end, closed) of the reasoning block; None without one."""
    start = text.find(self.reasoning_open)
    if start >= 0:
      body = start + len(self.reasoning_open)
    elif self.reasoning_close in text:
      start = body = 0
    else:
      return None
    end = text.find(self.reasoning_close, body)
    if end >= 0:
      return start, body, end, True
    stop = text.find(self.answer_open, body) if self.answer_open else -1
    return start, body, stop if stop >= 0 else len(text), False

  def parse(self, text: str) -> Parsed:
    """Reads reasoning and answer from assistant text, with or without the primer."""
    block = self._block(text)
    if block is None:
      # No reasoning block; a tagged answer can still be read for grading.
      answer = self._tagged_answer(text, 0)[0] if self.answer_open else None
      return Parsed(None, answer, False, False)
    start, body, end, closed = block
    reasoning = text[body:end]
    after = end + len(self.reasoning_close) if closed else end

    clean_start = closed and not text[:start].strip() and not self._has_marker(reasoning)
    if self.answer_open is not None:
      answer, a_open, a_end = self._tagged_answer(text, after)
      well_formed = (
          clean_start
          and answer is not None
          and a_end >= 0
          and not text[after:a_open].strip()
          and not text[a_end:].strip()
          and not self._has_marker(answer)
      )
    else:
      tail = text[after:] if closed else ""
      answer = self.tail_answer(tail) if closed and self.tail_answer else None
      well_formed = clean_start and answer is not None and not self._has_marker(tail)
    return Parsed(reasoning.strip(), answer, well_formed, closed)

  def redact(self, text: str) -> str:
    """`text` with its reasoning replaced by the reasoning's length; tags and answer kept.

    Without a reasoning block, everything before a tagged answer counts as reasoning.
    """
    block = self._block(text)
    if block is None:
      answer = text.find(self.answer_open) if self.answer_open else -1
      body, end = 0, answer if answer >= 0 else len(text)
    else:
      _, body, end, _ = block
    return f"{text[:body]}[{len(text[body:end].strip())} chars of reasoning redacted]{text[end:]}"

  def _tagged_answer(self, text: str, pos: int) -> tuple[str | None, int, int]:
    """(answer, index of answer_open, index just past answer_close or -1) from `pos` on."""
    a_open = text.find(self.answer_open, pos)
    if a_open < 0:
      return None, -1, -1
    content = a_open + len(self.answer_open)
    a_close = text.find(self.answer_close, content)
    if a_close < 0:
      return _strip_or_none(text[content:]), a_open, -1
    return _strip_or_none(text[content:a_close]), a_open, a_close + len(self.answer_close)


SCHEMAS: dict[str, TagSchema] = {
    "reasoning": TagSchema(
        name="reasoning",
        reasoning_open="<reasoning>",
        reasoning_close="</reasoning>",
        answer_open="<answer>",
        answer_close="</answer>",
        primer="<reasoning>\n",
        stop_strings=("</answer>",),
    ),
    "think": TagSchema(
        name="think",
        reasoning_open="<think>",
        reasoning_close="</think>",
        answer_open=None,
        answer_close=None,
        primer="<think>\n",
        stop_strings=(),
        answer_prefix="\n**Final Answer:** ",
        tail_answer=_final_answer_tail,
    ),
    "s1": TagSchema(
        name="s1",
        reasoning_open="<|think|>",
        reasoning_close="<|answer|>",
        answer_open=None,
        answer_close=None,
        primer="<|think|>\n",
        stop_strings=(),
        answer_prefix="Answer: ",
        tail_answer=_prefixed_tail,
    ),
}
assert tuple(SCHEMAS) == choices.SCHEMAS, "choices.SCHEMAS names these (config validates data.schema by it)"


def get_schema(name: str) -> TagSchema:
  """Looks up a schema by name."""
  if name not in SCHEMAS:
    raise UserError(f"Unknown tag schema {name!r}; valid: {', '.join(sorted(SCHEMAS))}")
  return SCHEMAS[name]
