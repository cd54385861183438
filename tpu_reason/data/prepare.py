"""Glue: DataCfg -> source records -> rendered, bucketed examples for train and eval.

Train and eval come from the same source:
  * reasoning_gym: train = (task, seed, size), eval = (task, eval_seed, eval_size);
  * file sources: eval = the last eval_size rows, train = `size` of the rest
    (a seeded sample in file order when there are more).
Eval rows whose id or normalised question (`question_tokens`: case,
spacing and punctuation ignored) also occurs in train are dropped (`in_train`), so eval
scores are never measured on trained prompts, even when a file repeats a question.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import re
import unicodedata
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

from tpu_reason import tags
from tpu_reason.config import DataCfg
from tpu_reason.data import sources
from tpu_reason.data.examples import Example, build_examples, build_prompts
from tpu_reason.data.report import DataReport
from tpu_reason.data.sources import LoadReport, Record
from tpu_reason.errors import UserError, first_line

GENERATED_SOURCES = ("reasoning_gym",)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_TOKEN = re.compile(r"\w+|[-+*/=<>^%$()]")


def question_tokens(text: str) -> tuple[str, ...]:
  """The normalised question as tokens: NFKC + casefold, split into words and the symbols `+ - * / = < > ^ % $ ( )`;
  other punctuation and all whitespace are ignored, so "What is 2+2?" and "what is 2 + 2" are the same question
  (the train/eval leak check here, the duplicate checks of `curate.quality`)."""
  return tuple(_TOKEN.findall(unicodedata.normalize("NFKC", text).casefold()))


def load_records(data: DataCfg, *, seed: int, size: int) -> tuple[list[Record], LoadReport]:
  """Records of the configured source; (seed, size) only matter for generated sources."""
  if data.source in GENERATED_SOURCES:
    name, options = parse_task(data.task)
    spec = {"kind": data.source, "name": name, "seed": seed, "size": size, "config": options or None}
  else:
    if not data.path:
      raise UserError(f"data.source={data.source} reads a file or hub dataset: set data.path")
    local = pathlib.Path(data.path)
    # A hub id ("openai/gsm8k") or glob is not a local path; catch plain typos cheaply.
    if local.suffix in LOCAL_SUFFIXES and not any(c in data.path for c in "*?[") and not local.exists():
      raise UserError(f"data.path not found: {data.path}")
    spec = {"kind": data.source, "path": data.path}
  try:
    return sources.load_source(spec, strict=data.strict)
  except UserError:
    raise
  except FileNotFoundError as e:
    raise UserError(f"data.path: {e}") from None
  except (ValueError, TypeError) as e:  # unknown source kind or reasoning-gym task
    what = f"data.task={data.task}" if data.source in GENERATED_SOURCES else f"data.path={data.path}"
    raise UserError(f"data.source={data.source} {what}: {e}") from None


def parse_task(task: str, key: str = "data.task") -> tuple[str, dict[str, Any]]:
  """"chain_sum:min_digits=1,max_terms=2" -> ("chain_sum", {"min_digits": 1, "max_terms": 2}); `key` is the
  setting the task came from (named in the error)."""
  name, _, rest = task.partition(":")
  options = {}
  for item in filter(None, (x.strip() for x in rest.split(","))):
    option, eq, value = item.partition("=")
    if not eq or not option.strip():
      raise UserError(f"{key} option {item!r} must look like key=value (in {task!r})")
    options[option.strip()] = yaml.safe_load(value)
  return name.strip(), options


def check_task(task: str, key: str):
  """A reasoning-gym task (with its options) that generates, or one line naming the setting `key` it came from:
  checked before a model loads or anything is written."""
  import reasoning_gym

  name, options = parse_task(task, key)
  try:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      reasoning_gym.create_dataset(name, seed=0, size=1, **options)
  except Exception as e:  # an unknown task, option or option value: the generator's own words
    raise UserError(f"{key}={task}: {first_line(e)}") from None


def split_file_records(
  records: Sequence[Record], *, size: int, eval_size: int, seed: int
) -> tuple[list[Record], list[Record], int]:
  """(train, eval, rows beyond `size`): eval is the file's tail, train a seeded sample of the rest."""
  if eval_size >= len(records):
    raise UserError(f"data.eval_size={eval_size} leaves no training rows ({len(records)} usable rows)")
  pool, held_out = list(records[: len(records) - eval_size]), list(records[len(records) - eval_size :])
  if len(pool) <= size:
    return pool, held_out, 0
  keep = np.sort(np.random.default_rng(seed).choice(len(pool), size, replace=False))
  return [pool[i] for i in keep], held_out, len(pool) - size


def held_out(evals: Sequence[Record], train: Sequence[Record]) -> list[Record]:
  """The eval rows that share neither an id nor a normalised question with any training row."""
  ids, questions = {r.id for r in train}, {question_tokens(r.prompt) for r in train}
  return [r for r in evals if r.id not in ids and question_tokens(r.prompt) not in questions]


def topped_up_eval(data: DataCfg, train: Sequence[Record]) -> tuple[list[Record], LoadReport]:
  """A generated eval split drawn on past the rows that training also has (a small task repeats its
  questions), so that it holds `data.eval_size` fresh rows: the shortest prefix of the `eval_seed` stream
  with that many, within 8x the size."""
  size = data.eval_size
  while True:
    evals, loaded = load_records(data, seed=data.eval_seed, size=size)
    fresh = {id(r) for r in held_out(evals, train)}
    if len(fresh) >= data.eval_size or size >= 8 * data.eval_size:
      break
    size *= 2
  if len(fresh) > data.eval_size:  # cut after the eval_size-th fresh row: the rest was never needed
    last = [i for i, r in enumerate(evals) if id(r) in fresh][data.eval_size - 1]
    evals = evals[: last + 1]
  return evals, loaded


@dataclasses.dataclass
class Splits:
  """Train and eval records, and the rows each split lost before tokenization."""

  train: list[Record]
  eval: list[Record]
  train_source: str
  eval_source: str
  train_dropped: dict[str, int]
  eval_dropped: dict[str, int]


def split_records(data: DataCfg) -> Splits:
  """Loads train and eval records; cheap, so config mistakes surface before the model loads."""
  records, loaded = load_records(data, seed=data.seed, size=data.size)
  train_dropped = dict(loaded.dropped)
  if data.source in GENERATED_SOURCES:
    train = records
    if data.eval_size:
      evals, eval_loaded = topped_up_eval(data, train)
      eval_source, eval_dropped = eval_loaded.source, dict(eval_loaded.dropped)
    else:
      evals, eval_source, eval_dropped = [], "none (data.eval_size=0)", {}
  else:
    if not records:
      what = "has no rows" if not loaded.seen else "has no usable rows"
      raise UserError(f"data.path={data.path} {what} ({loaded})")
    train, evals, over = split_file_records(records, size=data.size, eval_size=data.eval_size, seed=data.seed)
    train_dropped.update(held_out_eval=len(evals), over_size=over)
    eval_source, eval_dropped = f"{loaded.source} (last {len(evals)} rows)", {}
  fresh = held_out(evals, train)
  eval_dropped["in_train"] = len(evals) - len(fresh)
  return Splits(train, fresh, loaded.source, eval_source, train_dropped, eval_dropped)


def _examples(records, model, data: DataCfg, schema, split: str, source: str, dropped: dict[str, int]):
  examples, report = build_examples(
    records, model, schema,
    system_prompt=data.system_prompt,
    max_prompt_tokens=data.max_prompt_tokens,
    max_completion_tokens=data.max_completion_tokens,
    buckets=data.completion_buckets,
    split=split,
    source=source,
  )
  report.absorb(dropped)
  assert report.accounted, report
  return examples, report


def prepare(
  data: DataCfg, model: Any, splits: Splits | None = None
) -> tuple[list[Example], list[Example], dict[str, DataReport]]:
  """(train examples, eval examples, {"train": report, "eval": report})."""
  schema = tags.get_schema(data.schema)
  s = split_records(data) if splits is None else splits
  train, train_report = _examples(s.train, model, data, schema, "train", s.train_source, s.train_dropped)
  evals, eval_report = _examples(s.eval, model, data, schema, "eval", s.eval_source, s.eval_dropped)
  if not train:
    raise UserError(f"no training example survived: {train_report.summary()}")
  return train, evals, {"train": train_report, "eval": eval_report}


def prepare_prompts(data: DataCfg, model: Any, splits: Splits | None = None) -> tuple[list[Example], list[Example], dict]:
  """Prompt-only train / eval examples for RL (rows need a question and an answer, not a trace)."""
  s = split_records(data) if splits is None else splits
  train, train_report = _prompts(data, model, "train", s.train, s.train_source, s.train_dropped)
  evals, eval_report = _prompts(data, model, "eval", s.eval, s.eval_source, s.eval_dropped)
  if not train:
    raise UserError(f"no training prompt survived: {train_report.summary()}")
  return train, evals, {"train": train_report, "eval": eval_report}


def held_out_prompts(data: DataCfg, model: Any) -> tuple[list[Example], Any]:
  """The held-out split's prompts alone (the rows the trainers hold out of `data`), and its report."""
  s = split_records(data)
  return _prompts(data, model, "eval", s.eval, s.eval_source, s.eval_dropped)


def held_out_examples(data: DataCfg, model: Any) -> tuple[list[Example], Any]:
  """The held-out rows an SFT run of `data` scores (those whose trace fits as well as their prompt), and the report."""
  s = split_records(data)
  return _examples(s.eval, model, data, tags.get_schema(data.schema), "eval", s.eval_source, s.eval_dropped)


def _prompts(data: DataCfg, model: Any, split: str, records, source: str, dropped: dict[str, int]):
  examples, report = build_prompts(records, model, tags.get_schema(data.schema), system_prompt=data.system_prompt,
                                   max_prompt_tokens=data.max_prompt_tokens, split=split, source=source)
  report.absorb(dropped)
  assert report.accounted, report
  return examples, report
