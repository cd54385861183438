"""Rows from wherever a source lives: (location, row) pairs from a local JSONL / parquet / CSV file, a directory
of them, a glob, or a hub dataset id; a row that cannot be read is a `_Skip` in its place."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

from tpu_reason.data.sources.record import Row, Rows, _Skip
from tpu_reason.errors import UserError, first_line


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
