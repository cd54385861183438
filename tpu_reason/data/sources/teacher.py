"""The project's canonical teacher JSONL (prompt / chosen / metadata), both ways: `load_teacher` reads it,
`teacher_row` and `records_to_teacher_jsonl` write records in it (a record written reads back equal)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from tpu_reason.data.sources.readers import read_rows
from tpu_reason.data.sources.record import (LoadReport, Record, Row, _answer, _between, _checkpoints, _collect,
                                            _columns, _field, _prompt, _Skip, stable_id)

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
