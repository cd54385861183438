"""Rewards for GRPO: pure Python, no JAX, never raise, linear in the text length.

Every reward has the TRL/Tunix signature

    fn(prompts, completions, **columns) -> list[float | None]

(None: the reward does not apply to that row, as TRL allows.)

`completions` are full assistant texts (primer + generated, including any stop
string: re-append it if the sampler strips it, or `format` cannot reach 1.0).
Columns arrive as per-row lists: `answer` (gold final answers) and `checkpoints`
(strings the reasoning should contain); missing columns or None entries count
as empty and unknown columns are ignored. Every other field of a data row (`Record.columns`)
arrives the same way, one value per completion, so a new reward just names the columns it reads:
`fn(prompts, completions, difficulty, **_)`. `schema` (a name, a TagSchema, or a
per-row list of either; default "reasoning") picks the tag layout.

  format       1.0 if `TagSchema.parse` says well_formed, else 0.25 for each of
               {reasoning block opened, reasoning block closed, non-empty answer
               found after it}: so 0, 0.25, 0.5 or 0.75 when malformed.
  format_soft  1.0 if the reasoning block is closed and a non-empty answer
               follows it (anything allowed around the tags), else 0.0.
  process      fraction of the row's checkpoints found in the reasoning block,
               compared after `normalize_step`; 0.0 without block, None (does not
               apply: neither a penalty nor a credit) for a row without checkpoints.
  outcome      1.0 if `answers_match(parsed answer, gold)`, else 0.0.
"""

from __future__ import annotations

import decimal
import functools
import logging
import re
from collections.abc import Callable, Sequence

from math_verify import parse as mv_parse

# We bound math_verify by input size instead of its SIGALRM timeout; silence its warning about that.
logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
from math_verify import verify as mv_verify

from tpu_reason import choices
from tpu_reason.tags import Parsed, TagSchema, get_schema, last_boxed

Reward = Callable[..., list[float | None]]

# --------------------------------------------------------------- answers

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
# Patterns below start with a literal, so re skips ahead by fast search instead of
# trying every position of a 100 KB completion; lookbehinds then check the context.
_THOUSANDS = re.compile(r",(?<=\d,)(?=\d{3}(?!\d))")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_ANSWER_PREFIX = re.compile(r"(?:the )?(?:final )?answer(?: is)?(?::|\b) ?")
_NUMBER = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?")
# A number then a unit of 2+ letters ("18 dollars"); one letter may be algebra ("3 x").
_NUMBER_UNIT = re.compile(r"([+-]?(?:\d+(?:\.\d+)?|\.\d+))(?:\s*%|\s+[a-z]{2}[a-z .]*)")


def _canonical_number(s: str) -> str | None:
  """'+003.50' -> '3.5', '-0.0' -> '0'; None unless `s` is a plain decimal."""
  m = _NUMBER.fullmatch(s)
  if not m or not (m.group(2) or m.group(3)):
    return None
  sign, whole, frac = m.group(1), m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
  number = f"{whole}.{frac}" if frac else whole
  return number if sign != "-" or number == "0" else "-" + number


def normalize_answer(s: str | None) -> str:
  """Canonical form of a final answer for exact comparison ('' if nothing left)."""
  if s is None:
    return ""
  s = str(s).strip()
  boxed = last_boxed(s)
  if boxed is not None:
    s = boxed
  s = _TEXT_CMD.sub(r"\1", s)
  for old, new in (("\\$", ""), ("$", ""), ("\\%", "%"), ("\u2212", "-"), ("\\!", ""), ("\\,", " ")):
    s = s.replace(old, new)
  s = " ".join(s.lower().split()).strip("*").strip().rstrip(".").strip()
  s = _THOUSANDS.sub("", s)
  prefix = _ANSWER_PREFIX.match(s)
  if prefix:
    s = s[prefix.end():] or s
  head, _, rest = s.partition(" ")
  if head in _NUMBER_WORDS:
    s = _NUMBER_WORDS[head] + (" " + rest if rest else "")
  m = _NUMBER_UNIT.fullmatch(s)
  if m:
    s = m.group(1)
  s = _SPACE_GROUPED.sub("", s) if _SPACE_GROUPED_NUMBER.fullmatch(s) else s
  return _canonical_number(s) or _scientific(s) or _INFINITY.get(s) or s


# Forms math_verify misreads, settled before it: "1e3" parses as 1·e·3 (Euler's e), and
# "1 000" as plain text is right but "3 4" becomes 4 (its last number), so only strict
# three-digit groups lose their spaces.
_SCIENTIFIC = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)e[+-]?\d{1,3}")
_SPACE_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_SPACE_GROUPED = re.compile(r" (?=\d{3})")
_INFINITY = {f"{sign}{name}": ("-" if sign == "-" else "") + "\\infty"
             for sign in ("", "+", "-") for name in ("inf", "infinity", "\u221e", "\\infty", "\\inf")}


def _scientific(s: str) -> str | None:
  """'1.5e3' -> '1500', '2.5e-1' -> '0.25' (exact, by Decimal); None unless `s` is in e-notation."""
  if not _SCIENTIFIC.fullmatch(s):
    return None
  return _canonical_number(format(decimal.Decimal(s), "f"))




# math_verify can take seconds on deep nesting or power towers and its own timeout is a
# process-wide SIGALRM (unsafe inside training loops, threads and test runners), so instead
# only inputs known to be quick reach it: short, shallow, no towers or factorials.
_MATH_VERIFY_MAX_CHARS = 64
_MATH_VERIFY_MAX_DEPTH = 3
_SMALL_POWER = re.compile(r"\^(\{\s*)?(\d{1,3}|[a-z])(\s*\})?(?![\d{])")


def _quick(s: str) -> bool:
  """Whether math_verify is safe on `s` with no timeout: short, shallow, no towers."""
  if len(s) > _MATH_VERIFY_MAX_CHARS or "**" in s or "!" in s:
    return False
  if "^" in s and (s.count("^") > 1 or not _SMALL_POWER.search(s)):
    return False  # one small power (2^{10}, x^2) is quick; towers and huge exponents are not
  depth = deepest = 0
  for c in s:
    if c in "([{":
      depth += 1
      deepest = max(deepest, depth)
    elif c in ")]}":
      depth -= 1
  return deepest <= _MATH_VERIFY_MAX_DEPTH


def _mv_parse(s: str) -> list:
  return mv_parse(s, parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _symbolic_equal(pred: str, gold: str) -> bool:
  """math_verify equivalence of two short normalised answers; never raises."""
  try:
    gold_parsed = _mv_parse(f"${gold}$")
    if not gold_parsed:
      return False
    # Wrapped as LaTeX: parsed as plain text, math_verify would pull the last
    # number out of anything ("3x" -> 3) and reward hedging.
    target = _mv_parse(f"${pred}$")
    return bool(target) and mv_verify(gold_parsed, target, timeout_seconds=None)
  except Exception:
    return False


def _mathy(s: str) -> bool:
  return "\\" in s or any(c.isdigit() for c in s)


def answers_match(pred: str | None, gold: str | None) -> bool:
  """Whether a predicted final answer equals the gold one (normalised, then symbolic)."""
  a, b = normalize_answer(pred), normalize_answer(gold)
  if not a or not b:
    return False
  if a == b:
    return True
  if _canonical_number(a) is not None and _canonical_number(b) is not None:
    return False  # two different plain numbers: no need to ask sympy
  if not (_mathy(a) and _mathy(b) and _quick(a) and _quick(b)):
    return False
  return _symbolic_equal(a, b)


# ------------------------------------------------------------ checkpoints

_STEP_REPLACE = (
    ("\u00d7", "*"), ("\u2217", "*"), ("\u00b7", "*"), ("\u00f7", "/"),  # times, dot, divide
    ("\u2212", "-"), ("\u2013", "-"), ("$", ""),  # minus sign, en dash
)
_TIMES_BETWEEN_DIGITS = re.compile(r"x(?<=\dx)(?=\d)")
_TRAILING_ZEROS = re.compile(r"\.(?<=\d\.)0+(?!\d)")


def normalize_step(s: str) -> str:
  """Canonical arithmetic text: lowercase, '*' for times, no '1,000' commas or spaces by operators."""
  s = s.lower()
  for old, new in _STEP_REPLACE:
    s = s.replace(old, new)
  # Drop spaces only around operators: "= 8. 3 * 3" must not become "=8.3*3".
  s = " ".join(s.split()).replace(" x ", "x")
  for op in "+-*/=<>()^":
    s = s.replace(" " + op, op).replace(op + " ", op)
  s = _TIMES_BETWEEN_DIGITS.sub("*", s)
  s = _THOUSANDS.sub("", s)
  return _TRAILING_ZEROS.sub("", s)


@functools.lru_cache(maxsize=4096)
def _step_pattern(step: str) -> re.Pattern:
  """Regex for a normalised step that may not touch other digits at either end."""
  # "3" must not match inside "13" or "0.3", "8+9=17" not inside "8+9=170" or "8+9=17.5".
  # The "before" check is a 2-char lookbehind after the first char: leading with a
  # literal keeps re's fast scan, and the check stays O(1) inside long digit runs.
  first, rest = re.escape(step[0]), re.escape(step[1:])
  before = rf"(?<![\d.]{first})" if step[0].isdigit() else ""
  after = r"(?!\d|\.\d)" if step[-1].isdigit() else ""
  return re.compile(first + before + rest + after)


def _steps(checkpoints: Sequence[str]) -> list[str]:
  """The non-empty checkpoints, normalised."""
  steps = [normalize_step(str(c)) for c in checkpoints if c is not None]
  return [s for s in steps if s]


def checkpoint_fraction(reasoning: str | None, checkpoints: Sequence[str]) -> float:
  """Fraction of non-empty checkpoints found in `reasoning`."""
  return _fraction(reasoning, _steps(checkpoints))


def _fraction(reasoning: str | None, steps: list[str]) -> float:
  if reasoning is None or not steps:
    return 0.0
  text = normalize_step(reasoning)
  return sum(_step_pattern(s).search(text) is not None for s in steps) / len(steps)


# ---------------------------------------------------------------- rewards


def _text(completion) -> str:
  """Completion as text; also accepts TRL conversational [{'content': ...}] lists."""
  if isinstance(completion, str):
    return completion
  if completion is None:
    return ""
  if isinstance(completion, (list, tuple)):
    return "".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in completion)
  return str(completion)


def _pad(values, n: int) -> list:
  """`values` as a list of exactly n entries, padded with None."""
  values = [] if values is None or isinstance(values, str) else list(values)[:n]
  return values + [None] * (n - len(values))


def _checkpoint_list(value) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  return [str(v) for v in value if v is not None]


def _schemas(schema, n: int) -> list[TagSchema]:
  """One TagSchema per row from a name, a TagSchema, or a per-row list of either."""
  if isinstance(schema, (list, tuple)):
    return [s if isinstance(s, TagSchema) else get_schema(s or "reasoning") for s in _pad(schema, n)]
  one = schema if isinstance(schema, TagSchema) else get_schema(schema or "reasoning")
  return [one] * n


def _parsed(completions: list, schema) -> list[Parsed]:
  texts = [_text(c) for c in completions]
  return [s.parse(t) for s, t in zip(_schemas(schema, len(texts)), texts)]


def format_reward(prompts, completions, schema="reasoning", **columns) -> list[float]:
  """Strict structure: 1.0 well formed, else 0.25 per element present (max 0.75)."""
  scores = []
  for p in _parsed(completions, schema):
    if p.well_formed:
      scores.append(1.0)
    else:
      scores.append(0.25 * ((p.reasoning is not None) + p.closed_reasoning + (p.answer is not None)))
  return scores


def format_reward_soft(prompts, completions, schema="reasoning", **columns) -> list[float]:
  """Lenient structure: closed reasoning block followed by a non-empty answer."""
  return [float(p.closed_reasoning and p.answer is not None) for p in _parsed(completions, schema)]


def process_reward(prompts, completions, schema="reasoning", **columns) -> list[float | None]:
  """Fraction of the row's checkpoints that appear in the reasoning block; None for a row without
  checkpoints (a 0 would penalise every completion of a task that has none)."""
  parsed = _parsed(completions, schema)
  steps = [_steps(_checkpoint_list(c)) for c in _pad(columns.get("checkpoints"), len(parsed))]
  return [_fraction(p.reasoning, s) if s else None for p, s in zip(parsed, steps)]


def outcome_reward(prompts, completions, schema="reasoning", **columns) -> list[float]:
  """1.0 when the parsed final answer matches the gold answer."""
  parsed = _parsed(completions, schema)
  golds = _pad(columns.get("answer"), len(parsed))
  return [float(answers_match(p.answer, None if g is None else str(g))) for p, g in zip(parsed, golds)]


REWARDS: dict[str, Reward] = {
    "format": format_reward,
    "format_soft": format_reward_soft,
    "process": process_reward,
    "outcome": outcome_reward,
}
assert tuple(REWARDS) == choices.REWARDS, "choices.REWARDS names these (config validates grpo.rewards by it)"


def make_rewards(schema: str = "reasoning") -> dict[str, Reward]:
  """REWARDS bound to one schema, keeping `__name__` (TRL logs rewards by it)."""
  get_schema(schema)  # fail early on a typo

  def bind(fn: Reward) -> Reward:
    bound = functools.partial(fn, schema=schema)
    bound.__name__ = fn.__name__
    return bound

  return {name: bind(fn) for name, fn in REWARDS.items()}


def score(
    prompts, completions, weights: dict[str, float], /, **columns
) -> tuple[list[float], dict[str, list[float | None]]]:
  """Weighted total per row over the rewards that apply to it (None: skipped), and each weighted
  reward's raw per-row values. Every reward gets every column (positional-only arguments above: a
  column may be named `weights`)."""
  unknown = set(weights) - set(REWARDS)
  if unknown:
    raise ValueError(f"Unknown rewards {sorted(unknown)}; valid: {', '.join(REWARDS)}")
  parts = {name: REWARDS[name](prompts, completions, **columns) for name in weights}
  totals = [0.0] * len(completions)
  for name, values in parts.items():
    totals = [t if v is None else t + weights[name] * v for t, v in zip(totals, values)]
  return totals, parts
