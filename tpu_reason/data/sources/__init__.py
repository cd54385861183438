"""Load reasoning data sources and normalise them to one `Record` type.

  record   `Record`, `LoadReport`, `DataError`; the field checks a parser makes; `_collect`
  readers  `read_rows`: rows of a local file, a directory of them, a glob, or a hub dataset id
  teacher  the canonical teacher JSONL both ways: `load_teacher`, `teacher_row`, `records_to_teacher_jsonl`
  formats  GSM8K, s1K, dolphin-r1, reasoning-gym, any table; `file_kind` (detection); `load_source`, `LOADERS`

Every loader returns `(records, report)`; the report accounts for every row
seen: `report.seen == report.kept + sum(report.dropped.values())`.

Two kinds of drops:
  * bad input (malformed_json, bad_encoding, missing_field, wrong_type, empty_answer,
    empty_prompt, no_reasoning_tag): `strict=True` raises
    `DataError("file:line: ...")`, `strict=False` counts it.
  * content filters (`FILTERS`: no_delimiter, answer_mismatch, no_short_answer):
    the row is well formed but unusable; always counted, never raised.
"""

from tpu_reason.data.sources.formats import (DEFAULT_COLUMNS, LOADERS, MAX_SHORT_ANSWER,  # noqa: F401
                                             arithmetic_steps, column_map, dolphin_answer, file_kind,
                                             load_dolphin_r1, load_gsm8k, load_reasoning_gym, load_s1k, load_source,
                                             load_table, parse_gsm8k_answer, row_kind)
from tpu_reason.data.sources.readers import read_rows  # noqa: F401
from tpu_reason.data.sources.record import FILTERS, DataError, LoadReport, Record, stable_id  # noqa: F401
from tpu_reason.data.sources.teacher import (load_teacher, records_to_teacher_jsonl, render_chosen,  # noqa: F401
                                             teacher_row)
