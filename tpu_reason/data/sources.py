"""Load reasoning data sources and normalise them to one `Record` type.

Every loader returns `(records, report)`; the report accounts for every row
seen: `report.seen == report.kept + sum(report.dropped.values())`.

Two kinds of drops:
  * bad input (malformed_json, bad_encoding, missing_field, wrong_type, empty_answer,
    empty_prompt, no_reasoning_tag): `strict=True` raises
    `DataError("file:line: ...")`, `strict=False` counts it.
  * content filters (`FILTERS`: no_delimiter, answer_mismatch, no_short_answer):
    the row is well formed but unusable; always counted, never raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import logging
import pathlib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from tpu_reason import choices
from tpu_reason.errors import UserError, first_line
from tpu_reason.tags import last_boxed

FILTERS = frozenset({"no_delimiter", "answer_mismatch", "no_short_answer"})

# Beyond this an answer is prose, useless for exact-match outcome rewards.
MAX_SHORT_ANSWER = 64


@dataclasses.dataclass(frozen=True)
class Record:
  """One normalised example: prompt, reasoning trace, gold answer, and the row's other columns."""

  id: str
  prompt: str
  reasoning: str
  answer: str
  checkpoints: tuple[str, ...]
  domain: str
  # The row's fields the trainer does not read itself (e.g. a difficulty score): each reaches every reward
  # as a keyword list, so a new column needs no code between the data file and its reward.
  # Not hashed: a dict is not hashable.
  columns: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass
class LoadReport:
  """How many rows a loader saw, kept, and dropped per reason."""

  source: str
  seen: int = 0
  kept: int = 0
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)

  def __str__(self) -> str:
    drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
    return f"{self.source}: kept {self.kept}/{self.seen}" + (f" ({drops})" if drops else "")


class DataError(UserError):
  """A malformed input row (a ValueError); the message starts with `file:line:`."""


class _Skip(Exception):
  """Raised by row parsers; `reason` is the LoadReport.dropped key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(detail or reason)
    self.reason = reason
    self.detail = detail or reason


Row = Mapping[str, Any]
Rows = Iterable[tuple[str, Row | _Skip]]  # (location for errors, row)


# ---------------------------------------------------------------- helpers


def stable_id(prefix: str, text: str) -> str:
  """Id that survives reshuffles and re-downloads: a hash of the text."""
  return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _field(row: Row, key: str, kind: type | tuple[type, ...] = str) -> Any:
  """row[key], checked present (None counts as missing) and of `kind`."""
  value = row.get(key)
  if value is None:
    raise _Skip("missing_field", f"missing field {key!r}")
  if not isinstance(value, kind) or isinstance(value, bool):
    want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise _Skip("wrong_type", f"field {key!r} should be {want}, got {type(value).__name__}")
  return value


# Not kept as columns: the Record's own fields and the arguments a reward already takes
# (`fn(prompts, completions, schema=..., **columns)`), which a column of that name would clash with.
_NOT_COLUMNS = frozenset(f.name for f in dataclasses.fields(Record)) | {"prompts", "completions", "schema"}


def _columns(row: Row, used: Iterable[str]) -> dict[str, Any]:
  """The row's fields beyond `used` (the ones its loader read), as Record.columns."""
  skip = _NOT_COLUMNS.union(used)
  return _json_values({k: v for k, v in row.items() if k not in skip})


def _json_values(columns: dict[str, Any]) -> dict[str, Any]:
  """`columns` as JSON values (tuples as lists, anything else non-JSON as str), what a JSONL row holds:
  so a record written out (`teacher_row`) reads back equal, whichever source it came from."""
  return json.loads(json.dumps(columns, default=str)) if columns else {}


def _first_field(row: Row, keys: tuple[str, ...], kind: type | tuple[type, ...] = str) -> Any:
  """The first of `keys` present in row; a missing-field error names the first."""
  for key in keys:
    if row.get(key) is not None:
      return _field(row, key, kind)
  return _field(row, keys[0], kind)


def _answer(value: Any, name: str = "answer") -> str:
  """A gold answer as a non-empty string; JSON numbers are accepted."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise _Skip("wrong_type", f"field {name!r} should be str, got {type(value).__name__}")
  if not value.strip():
    raise _Skip("empty_answer", f"empty answer in {name!r}")
  return value.strip()


def _prompt(value: str, name: str = "prompt") -> str:
  """A prompt, stripped and non-empty."""
  if not value.strip():
    raise _Skip("empty_prompt", f"empty prompt in {name!r}")
  return value.strip()


def _checkpoints(value: Any, name: str = "checkpoints") -> tuple[str, ...]:
  """A list of str as a tuple."""
  if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
    raise _Skip("wrong_type", f"field {name!r} should be a list of str")
  return tuple(value)


def _between(text: str, start: str, end: str) -> str | None:
  """Text between the first `start` and the next `end`, or None."""
  i = text.find(start)
  if i < 0:
    return None
  i += len(start)
  j = text.find(end, i)
  return None if j < 0 else text[i:j]


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


# ------------------------------------------------------------------- rows


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[str, Row | _Skip]]:
  """(path:line, object) per non-blank line; bad lines (JSON, UTF-8, type) yield a _Skip."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      loc = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield loc, _Skip("bad_encoding", f"invalid UTF-8 (byte {e.start + 1} of the line)")
        continue
      if not line.strip():
        continue  # blank lines are not rows (e.g. a trailing newline)
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        yield loc, _Skip("malformed_json", f"malformed JSON ({e.msg})")
        continue
      yield loc, row if isinstance(row, dict) else _Skip("wrong_type", "row is not a JSON object")


@contextlib.contextmanager
def _quiet_datasets():
  """Silence datasets' progress bars without changing the caller's setting."""
  import datasets

  was_enabled = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  log = logging.getLogger("datasets")  # a bad file's error is ours to report, in one line
  level = log.level
  log.setLevel(logging.CRITICAL)
  try:
    yield datasets
  finally:
    log.setLevel(level)
    if was_enabled:
      datasets.enable_progress_bars()


_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _dataset_rows(path: str, where: str, **load_kwargs: Any) -> Rows:
  """Rows of `datasets.load_dataset(path, ...)`; its failures (offline hub, corrupt file) are UserErrors."""
  with _quiet_datasets() as datasets:
    try:
      ds = datasets.load_dataset(path, **load_kwargs)
    except (FileNotFoundError, ConnectionError) as e:
      raise UserError(f"{where}: cannot load ({first_line(e)})") from None
    except Exception as e:  # datasets wraps a corrupt file's error in its own generic ones
      cause = e.__cause__ or e
      raise UserError(f"{where}: cannot read ({first_line(cause)})") from None
  return ((f"{where}:row {i + 1}", row) for i, row in enumerate(ds))


def _dir_rows(path: pathlib.Path, split: str, config: str | None) -> Rows:
  """Every .jsonl/.json/.parquet/.csv file directly in `path`, in name order, each read as a file;
  a directory without such files is handed to datasets (a saved hub dataset's layout)."""
  files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _BUILDERS)
  if not files:
    try:
      return _dataset_rows(str(path), f"{path}[{split}]", name=config, split=split)
    except UserError as e:  # not a dataset folder either: say first what the folder lacks
      raise UserError(f"{path}: no {'/'.join(sorted(_BUILDERS))} file in this directory, and it does not load as a "
                      f"dataset folder ({str(e).split(': ', 1)[-1]})") from None
  return itertools.chain.from_iterable(read_rows(f) for f in files)


def read_rows(path: str | pathlib.Path, *, split: str = "train", config: str | None = None) -> Rows:
  """(location, row) pairs from a local JSONL/parquet/CSV file, a directory of them, a glob, or a hub dataset id."""
  p = pathlib.Path(path)
  # Our own JSONL reader: datasets rejects a whole file for one bad line and
  # loses line numbers, which strict errors must report.
  if p.is_file() and p.suffix in (".jsonl", ".json"):
    return _jsonl_rows(p)
  if p.is_dir():
    return _dir_rows(p, split, config)
  if builder := _BUILDERS.get(p.suffix):  # local file(s), possibly a glob; data_files always land in "train"
    return _dataset_rows(builder, str(path), data_files=str(path), split="train")
  if p.is_file():  # not a hub id: a local file of a format no reader takes
    raise UserError(f"{path}: cannot read a {p.suffix or 'suffix-less'} file as data (known: "
                    f"{', '.join(sorted(_BUILDERS))}, or a directory of them)")
  # A hub id: HF_DATASETS_OFFLINE=1 makes it use the cache only.
  return _dataset_rows(str(path), f"{path}[{split}]", name=config, split=split)


def _collect(
  source: str, rows: Rows, parse: Callable[[Row], Record], strict: bool
) -> tuple[list[Record], LoadReport]:
  """Parses rows into records, raising or counting each drop."""
  report = LoadReport(source)
  records = []
  for loc, row in rows:
    report.seen += 1
    try:
      if isinstance(row, _Skip):
        raise row
      records.append(parse(row))
    except _Skip as skip:
      if strict and skip.reason not in FILTERS:
        raise DataError(f"{loc}: {skip.detail}") from None
      report.dropped[skip.reason] = report.dropped.get(skip.reason, 0) + 1
  report.kept = len(records)
  return records, report


# ---------------------------------------------------------------- teacher

_REASONING_TAGS = (("<reasoning>", "</reasoning>"), ("<think>", "</think>"))


def _reasoning_block(chosen: str) -> str | None:
  """Text inside <reasoning>...</reasoning> (or <think>...</think>), or None."""
  for start, end in _REASONING_TAGS:
    if (inner := _between(chosen, start, end)) is not None:
      return inner
  return None


def _teacher_record(row: Row, domain: str) -> Record:
  prompt = _prompt(_field(row, "prompt"))
  chosen = _field(row, "chosen")
  reasoning = _reasoning_block(chosen)
  if reasoning is None:
    raise _Skip("no_reasoning_tag", "field 'chosen' has no <reasoning>...</reasoning> or <think>...</think>")
  meta = row.get("metadata") or {}
  if not isinstance(meta, Mapping):
    raise _Skip("wrong_type", f"field 'metadata' should be dict, got {type(meta).__name__}")
  if meta.get("final_answer") is not None:
    answer = _answer(meta["final_answer"], "metadata.final_answer")
  elif (tagged := _between(chosen, "<answer>", "</answer>")) is not None:
    answer = _answer(tagged, "chosen <answer>")
  else:
    raise _Skip("missing_field", "missing field 'metadata.final_answer' (and no <answer> in 'chosen')")
  checkpoints = _checkpoints(meta.get("checkpoints", []), "metadata.checkpoints")
  row_id = _field(row, "id") if row.get("id") is not None else stable_id("teacher", prompt)
  row_domain = _field(row, "domain") if row.get("domain") is not None else domain
  columns = {**_columns(meta, ("final_answer",)), **_columns(row, ("chosen", "metadata"))}
  return Record(row_id, prompt, reasoning.strip(), answer, checkpoints, row_domain, columns)


def load_teacher(
  path: str | pathlib.Path, *, domain: str = "math", strict: bool = True
) -> tuple[list[Record], LoadReport]:
  """The project's canonical teacher JSONL (prompt / chosen / metadata)."""
  return _collect(str(path), read_rows(path), lambda r: _teacher_record(r, domain), strict)


def render_chosen(record: Record) -> str:
  """The tagged completion SFT trains on."""
  return f"<reasoning>{record.reasoning}</reasoning><answer>{record.answer}</answer>"


def teacher_row(r: Record, **metadata: Any) -> dict[str, Any]:
  """One record as a canonical teacher JSONL row; extra `metadata` (e.g. the teacher's name) is kept."""
  # A closing tag inside the text would not survive a reload.
  if "</reasoning>" in r.reasoning or "</answer>" in r.answer:
    raise ValueError(f"record {r.id}: reasoning/answer contains a closing tag")
  return {
    "id": r.id,
    "domain": r.domain,
    "prompt": r.prompt,
    "chosen": render_chosen(r),
    # columns go back into metadata, where load_teacher finds them
    "metadata": {**r.columns, "checkpoints": list(r.checkpoints), "final_answer": r.answer, **metadata},
  }


def records_to_teacher_jsonl(records: Iterable[Record], path: str | pathlib.Path) -> int:
  """Writes records in the canonical teacher format; returns the count."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(teacher_row(r), ensure_ascii=False) + "\n")
      n += 1
  return n


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
