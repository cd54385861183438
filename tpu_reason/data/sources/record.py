"""The one type every source is normalised to (`Record`), the load report, and the checks a format's parser
makes on a row's fields: a row it cannot use raises `_Skip(reason)`, which `_collect` counts or raises."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tpu_reason.errors import UserError

FILTERS = frozenset({"no_delimiter", "answer_mismatch", "no_short_answer"})


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
