"""The other formats a source may come in (GSM8K, s1K, dolphin-r1, reasoning-gym, any table with a column
mapping), each a row parser and its loader; which format a file's first row calls for (`file_kind`); and
`load_source`, which loads a source of any kind (`LOADERS`) from its spec."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import pathlib
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from tpu_reason import choices
from tpu_reason.data.sources.readers import read_rows
from tpu_reason.data.sources.record import (LoadReport, Record, Row, _answer, _between, _checkpoints, _collect,
                                            _columns, _field, _first_field, _json_values, _prompt, _Skip, stable_id)
from tpu_reason.data.sources.teacher import load_teacher
from tpu_reason.tags import last_boxed

# Beyond this an answer is prose, useless for exact-match outcome rewards.
MAX_SHORT_ANSWER = 64


def _short_answer(text: str) -> str:
  r"""\boxed{} content, else the text if short, else its last non-empty line."""
  found = last_boxed(text)
  if found is not None:
    return found
  text = text.strip()
  if len(text) < MAX_SHORT_ANSWER and "\n" not in text:
    return text
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _same_number(a: str, b: str) -> bool:
  """Numeric equality when both parse (so '8.0' == '8'), else string equality."""
  try:
    return float(a.replace(",", "")) == float(b.replace(",", ""))
  except ValueError:
    return a.strip() == b.strip()


# An arithmetic step as written in gsm_symbolic CoTs: "35 × 3 = 105",
# "$400,000 x 8/100 = $32,000", "42 orders/day * 3 = 126", "2x+140=198".
_NUM = r"[$£€]?\d+(?:,\d{3})*(?:\.\d+)?%?"
_TERM = rf"(?:{_NUM}|\d+[a-z](?![A-Za-z]))"
_UNIT = r"(?:/[A-Za-z]+)?(?:\s+[A-Za-z]+(?:/[A-Za-z]+)?){0,2}"  # "/day", "days/month"
_OP = r"\s*(?:[-+*/×÷]|x(?=\s*[$£€\d]))\s*"
_STEP = re.compile(rf"(?<![\w.$£€]){_TERM}{_UNIT}(?:{_OP}{_TERM}{_UNIT})+\s*=\s*-?{_NUM}")


def arithmetic_steps(text: str) -> tuple[str, ...]:
  """Verbatim `a op b = c` steps in text, deduplicated, in order."""
  return tuple(dict.fromkeys(m.group(0) for m in _STEP.finditer(text)))


# ------------------------------------------------------------------ gsm8k

_CALC = re.compile(r"<<([^<>]*)>>")


def parse_gsm8k_answer(text: str) -> tuple[str, str, tuple[str, ...]] | None:
  """(reasoning, answer, checkpoints) from a GSM8K solution, None without '####'."""
  trace, sep, final = text.rpartition("####")
  if not sep:
    return None
  checkpoints = tuple(_CALC.findall(trace))
  return _CALC.sub("", trace).strip(), final.strip().replace(",", ""), checkpoints


def _gsm8k_record(row: Row, domain: str) -> Record:
  prompt = _prompt(_field(row, "question"), "question")
  parsed = parse_gsm8k_answer(_field(row, "answer"))
  if parsed is None:
    raise _Skip("no_delimiter")
  reasoning, answer, checkpoints = parsed
  return Record(stable_id("gsm8k", prompt), prompt, reasoning, _answer(answer), checkpoints, domain,
                _columns(row, ("question",)))


def load_gsm8k(
  path: str | pathlib.Path,
  *,
  split: str = "train",
  config: str | None = "main",
  domain: str = "math",
  strict: bool = True,
) -> tuple[list[Record], LoadReport]:
  """GSM8K rows (question / answer with '#### N') from a file or a hub id."""
  rows = read_rows(path, split=split, config=config)
  return _collect(str(path), rows, lambda r: _gsm8k_record(r, domain), strict)


# -------------------------------------------------------------------- s1K

_TRAJECTORY_KEYS = ("thinking_trajectories", "deepseek_thinking_trajectory", "gemini_thinking_trajectory")
_THINK, _ANSWER, _END = "<|im_start|>think", "<|im_start|>answer", "<|im_end|>"


def _chat_user(text: str) -> str:
  """The user turn of a ChatML string, or the text itself if not ChatML."""
  user = _between(text, "<|im_start|>user", _END)
  return text if user is None else user


def _s1k_record(row: Row, domain: str) -> Record:
  if any(row.get(k) is not None for k in _TRAJECTORY_KEYS):
    prompt = _prompt(_field(row, "question"), "question")
    trajectory = _first_field(row, _TRAJECTORY_KEYS, (list, str))
    if isinstance(trajectory, list) and not all(isinstance(t, str) for t in trajectory):
      raise _Skip("wrong_type", "field 'thinking_trajectories' should be a list of str")
    reasoning = trajectory if isinstance(trajectory, str) else "\n\n".join(trajectory)
    answer_text = _field(row, "solution")
  else:  # tokenized variant: one ChatML string with think/answer markers
    chat = _first_field(row, ("chosen", "text"))
    prompt = _prompt(_chat_user(_first_field(row, ("question", "prompt", "text"))), "prompt")
    i, j = chat.find(_THINK), chat.find(_ANSWER)
    if i < 0 or j < i:
      raise _Skip("no_delimiter")
    reasoning = chat[i + len(_THINK) : j]
    attempt = chat[j + len(_ANSWER) :].split(_END, 1)[0].strip().removeprefix("Answer:")
    answer_text = _field(row, "solution") if row.get("solution") is not None else attempt
  answer = _answer(_short_answer(_answer(answer_text, "solution")), "solution")
  row_domain = row.get("cot_type") if isinstance(row.get("cot_type"), str) else domain
  return Record(stable_id("s1k", prompt), prompt, reasoning.strip(), answer, (), row_domain)


def load_s1k(
  path: str | pathlib.Path,
  *,
  split: str = "train",
  config: str | None = None,
  domain: str = "math",
  strict: bool = True,
) -> tuple[list[Record], LoadReport]:
  """s1K rows (question / thinking_trajectories / solution) or its tokenized ChatML variant."""
  rows = read_rows(path, split=split, config=config)
  return _collect(str(path), rows, lambda r: _s1k_record(r, domain), strict)


# ------------------------------------------------------------- dolphin-r1


def dolphin_answer(text: str) -> str | None:
  r"""\boxed{} content, else the line after '**Final Answer', else short text, else None."""
  found = last_boxed(text)
  if found is None:
    _, marker, rest = text.partition("**Final Answer")
    if marker:
      lines = rest.lstrip(":* \n").splitlines()
      text = lines[0] if lines else ""
    found = text.strip()
    if len(found) >= MAX_SHORT_ANSWER:
      return None
  return found


def _dolphin_record(row: Row, domain: str) -> Record:
  messages = _field(row, "messages", list)
  users = [m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
  if not users:
    raise _Skip("missing_field", "missing field 'messages[role=user]'")
  if not isinstance(users[-1], str):
    raise _Skip("wrong_type", "user message content should be str")
  prompt = _prompt(users[-1], "messages")
  answer = dolphin_answer(_answer(_field(row, "answer")))
  if answer is None:
    raise _Skip("no_short_answer")
  reasoning = _field(row, "reasoning")
  return Record(stable_id("dolphin", prompt), prompt, reasoning.strip(), _answer(answer), (), domain)


def load_dolphin_r1(
  path: str | pathlib.Path,
  *,
  split: str = "train",
  config: str | None = "reasoning-deepseek",
  domain: str = "general",
  strict: bool = True,
) -> tuple[list[Record], LoadReport]:
  """dolphin-r1 rows (messages / reasoning / answer); keeps only short-answer rows."""
  rows = read_rows(path, split=split, config=config)
  return _collect(str(path), rows, lambda r: _dolphin_record(r, domain), strict)


# ---------------------------------------------------------- reasoning-gym


def _gym_record(row: Row, name: str) -> Record:
  prompt = _prompt(_field(row, "question"), "question")
  answer = _answer(_field(row, "answer", (str, int, float)))
  meta = row.get("metadata") or {}
  reasoning, checkpoints = "", ()
  if isinstance(meta.get("answer_cot"), str):
    cot, sep, final = meta["answer_cot"].rpartition("####")
    if not sep:
      raise _Skip("no_delimiter")
    if not _same_number(final.strip(), answer):
      raise _Skip("answer_mismatch")
    reasoning = cot.strip()
    checkpoints = arithmetic_steps(reasoning)
  # the entry's metadata as one column: with question and answer, what reasoning_gym's score_answer reads
  columns = _json_values({"metadata": meta}) if meta else {}
  return Record(stable_id(name, prompt), prompt, reasoning, answer, checkpoints, name, columns)


def load_reasoning_gym(
  name: str = "gsm_symbolic",
  *,
  seed: int = 0,
  size: int = 100,
  config: Mapping[str, Any] | None = None,
  strict: bool = True,
) -> tuple[list[Record], LoadReport]:
  """Generates `size` rows of a reasoning-gym task offline; domain = task name."""
  import reasoning_gym

  # Some task generators print or warn; a data loader should not.
  with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **(config or {}))
    entries = list(dataset)
  source = f"reasoning_gym:{name}:seed={seed}"
  rows = ((f"{source}:{i}", entry) for i, entry in enumerate(entries))
  return _collect(source, rows, lambda r: _gym_record(r, name), strict)


# ---------------------------------------------------------- generic table

_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record) if f.name != "columns")
DEFAULT_COLUMNS = {"question": "prompt"}


def column_map(columns: Mapping[str, str] | None) -> dict[str, str]:
  """{record field: source column}: identity, overridden by `columns` ({column: field})."""
  fields = {f: f for f in _RECORD_FIELDS}
  for column, field in (DEFAULT_COLUMNS if columns is None else columns).items():
    if field not in fields:
      raise ValueError(f"column {column!r} maps to unknown Record field {field!r}")
    fields[field] = column
  return fields


def _table_record(row: Row, fields: Mapping[str, str], domain: str) -> Record:
  # A row may name its prompt after the field itself ("prompt") instead of the mapped column.
  prompt = _prompt(_first_field(row, (fields["prompt"], "prompt")), fields["prompt"])
  answer = _answer(_field(row, fields["answer"], (str, int, float)), fields["answer"])

  def optional(name: str, default: Any, kind: type = str) -> Any:
    column = fields[name]
    return default if row.get(column) is None else _field(row, column, kind)

  checkpoints = _checkpoints(optional("checkpoints", [], (list, tuple)), fields["checkpoints"])
  row_id = str(optional("id", "", (str, int))) or stable_id("row", prompt)
  reasoning = optional("reasoning", "").strip()
  columns = _columns(row, (*fields.values(), "prompt"))
  return Record(row_id, prompt, reasoning, answer, checkpoints, optional("domain", domain), columns)


def load_table(
  path: str | pathlib.Path,
  *,
  columns: Mapping[str, str] | None = None,
  domain: str = "math",
  split: str = "train",
  config: str | None = None,
  strict: bool = True,
) -> tuple[list[Record], LoadReport]:
  """Any JSONL/parquet file (or glob, or hub id) with a {column: Record field} mapping.

  Columns already named like Record fields need no mapping; the default maps
  `question` to prompt. Every other column is kept in `Record.columns` (for rewards).
  """
  fields = column_map(columns)
  rows = read_rows(path, split=split, config=config)
  return _collect(str(path), rows, lambda r: _table_record(r, fields, domain), strict)


# ------------------------------------------------------------- detection


def row_kind(row: Row) -> str | None:
  """The loader a row's own fields call for (teacher, gsm8k, s1k, dolphin_r1), or None for a plain table."""
  if "prompt" in row and "chosen" in row:
    return "teacher"
  if "messages" in row and "reasoning" in row:
    return "dolphin_r1"
  if any(k in row for k in _TRAJECTORY_KEYS):
    return "s1k"
  if isinstance(row.get("question"), str) and isinstance(row.get("answer"), str) and "####" in row["answer"]:
    return "gsm8k"
  return None


def file_kind(path: str | pathlib.Path) -> str:
  """The source kind of a local JSONL / parquet file, from its first row; jsonl / parquet when unsure."""
  table = "parquet" if str(path).endswith(".parquet") else "jsonl"
  if not pathlib.Path(path).is_file():
    return table  # the loader reports the missing file
  first = next(iter(read_rows(path)), None)
  if first is None or isinstance(first[1], _Skip):
    return table
  return row_kind(first[1]) or table


# ------------------------------------------------------------- dispatcher

LOADERS: dict[str, Callable[..., tuple[list[Record], LoadReport]]] = {
  "teacher": load_teacher,
  "gsm8k": load_gsm8k,
  "s1k": load_s1k,
  "dolphin_r1": load_dolphin_r1,
  "dolphin-r1": load_dolphin_r1,
  "reasoning_gym": load_reasoning_gym,
  "jsonl": load_table,
  "parquet": load_table,
}
assert tuple(LOADERS) == choices.SOURCES, "choices.SOURCES names these (config validates data.source by it)"


def load_source(spec: Mapping[str, Any] | Any = None, /, **kwargs: Any) -> tuple[list[Record], LoadReport]:
  """Loads one source from a dict / dataclass / kwargs with a `kind` key."""
  if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
    spec = dataclasses.asdict(spec)
  # None means "use the loader's default", so optional config fields can stay unset.
  spec = {k: v for k, v in {**(spec or {}), **kwargs}.items() if v is not None}
  kind = spec.pop("kind", None)
  if kind not in LOADERS:
    raise ValueError(f"unknown source kind {kind!r}; known: {sorted(LOADERS)}")
  loader = LOADERS[kind]
  params = inspect.signature(loader).parameters
  if unknown := sorted(set(spec) - set(params)):
    raise TypeError(f"source kind {kind!r} does not take {unknown}; it takes {sorted(params)}")
  return loader(**spec)
