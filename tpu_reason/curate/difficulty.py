"""Difficulty stage: keep the questions the baseline models fail.

Each question is posed to each baseline (`curate.baselines`, any spec
`models.load` takes) as training renders it (chat template, system prompt, tag
primer); the sampler prefills it once and decodes k samples (`group=k`), which
the training outcome reward scores. A question that some baseline solves in more
than `max_solved` of its k samples is `too_easy`; it is not posed to the
baselines after that one.

Questions go to the model shortest first, in batches of `batch_size` prompts
left-padded to `sampler.prompt_width` (the last batch filled up with copies:
`sampling.batched.generate_texts`), so a batch pads little and only a few shapes ever compile.

Solved counts go to an append-only JSONL cache in the output directory, one line
per (baseline, sampling settings, question) written and flushed after every
batch, so a rerun, or a run after a kill, only generates for questions not yet
scored. A line torn by a kill is cut off when the cache is reopened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tpu_reason.data.render import render
from tpu_reason.data.sources import Record
from tpu_reason.tags import TagSchema

REASONS = ("too_easy",)
CACHE_FILE = "difficulty_cache.jsonl"

# solver(records) -> per record, how many of its k samples were solved.
Solver = Callable[[Sequence[Record]], list[int]]


def question_key(record: Record) -> str:
  """Hash of what a question is scored on: its prompt and gold answer."""
  return hashlib.sha256(json.dumps([record.prompt, record.answer]).encode()).hexdigest()[:20]


def settings_key(settings: Mapping[str, Any]) -> str:
  """Hash of everything besides the question that changes a solved count."""
  return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:12]


class ScoreCache:
  """Append-only JSONL of solved counts keyed by (model, settings, question)."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    self.scores: dict[tuple[str, str, str], int] = {}
    if not self.path.exists():
      return
    data = self.path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):  # a kill mid-write: drop the torn tail before appending again
      with open(self.path, "r+b") as f:
        f.truncate(len(whole))
    for line in whole.decode().splitlines():
      row = json.loads(line)
      self.scores[row["model"], row["settings"], row["question"]] = row["solved"]

  def get(self, model: str, settings: str, question: str) -> int | None:
    return self.scores.get((model, settings, question))

  def add(self, model: str, settings: str, solved: Mapping[str, int]):
    """Records {question: solved} durably (flushed and fsynced)."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      for question, n in solved.items():
        f.write(json.dumps({"model": model, "settings": settings, "question": question, "solved": int(n)}) + "\n")
        self.scores[model, settings, question] = int(n)
      f.flush()
      os.fsync(f.fileno())


def score_questions(records: Sequence[Record], make_solver: Callable[[], Solver], cache: ScoreCache,
                    model: str, settings: str, batch_size: int) -> tuple[list[int], int]:
  """(solved count per record, questions generated now); only uncached questions reach the solver.

  `make_solver()` is called only when something is left to score, so a fully
  cached rerun never loads the model.
  """
  from tqdm.auto import tqdm

  keys = [question_key(r) for r in records]
  todo = {}  # key -> record, first occurrence, in order
  for key, record in zip(keys, records):
    if cache.get(model, settings, key) is None:
      todo.setdefault(key, record)
  if todo:
    solve = make_solver()
    pending = sorted(todo.items(), key=lambda item: len(item[1].prompt))  # similar lengths share a batch
    with tqdm(total=len(pending), desc=f"difficulty {model}", unit="q", dynamic_ncols=True) as bar:
      for i in range(0, len(pending), batch_size):
        batch = pending[i : i + batch_size]
        solved = solve([r for _, r in batch])
        cache.add(model, settings, {key: n for (key, _), n in zip(batch, solved, strict=True)})
        bar.update(len(batch))
  return [cache.get(model, settings, key) for key in keys], len(todo)


@dataclasses.dataclass
class BaselineStats:
  """How one baseline did on the questions posed to it."""

  model: str
  posed: int = 0
  cached: int = 0
  generated: int = 0
  solved_any: int = 0  # questions solved in at least one sample
  too_easy: int = 0  # questions this baseline culled
  mean_solve_rate: float = 0.0  # mean over posed questions of solved / k
  solve_rate_by_stratum: dict[str, float] = dataclasses.field(default_factory=dict)


def verdicts(records: Sequence[Record], strata: Sequence[str], baselines: Sequence[str],
             make_solver: Callable[[str], Solver], cache: ScoreCache, settings: str, *,
             k: int, max_solved: int, batch_size: int) -> tuple[list[str | None], list[dict[str, int]], list[BaselineStats]]:
  """(per row None or "too_easy", per row {baseline: solved}, per-baseline stats)."""
  out: list[str | None] = [None] * len(records)
  solved_by: list[dict[str, int]] = [{} for _ in records]
  stats = []
  for model in baselines:
    alive = [i for i, v in enumerate(out) if v is None]
    counts, generated = score_questions([records[i] for i in alive], lambda: make_solver(model), cache, model,
                                        settings, batch_size)
    s = BaselineStats(model, posed=len(alive), generated=generated, cached=len(alive) - generated)
    for i, n in zip(alive, counts):
      solved_by[i][model] = n
      s.solved_any += n > 0
      if n > max_solved:
        out[i] = "too_easy"
        s.too_easy += 1
    if alive:
      rates = np.array(counts) / k
      s.mean_solve_rate = float(rates.mean())
      by = {}
      for i, rate in zip(alive, rates):
        by.setdefault(strata[i], []).append(rate)
      s.solve_rate_by_stratum = {key: float(np.mean(v)) for key, v in sorted(by.items())}
    stats.append(s)
  return out, solved_by, stats


class ModelSolver:
  """Poses batches of questions to one model at a few fixed shapes; counts outcome-reward hits of k samples."""

  def __init__(self, model, schema: TagSchema, *, system_prompt: str, sampling, k: int, batch_size: int,
               mesh=None):
    import jax

    from tpu_reason import mesh as mesh_lib, models
    from tpu_reason.config import MeshCfg

    self.model, self.schema, self.system_prompt = model, schema, system_prompt
    self.sampling, self.k, self.batch_size = sampling, k, batch_size
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(MeshCfg(fsdp=1, tp=1), jax.devices()[:1])
    self.params = models.place_params(model.params, model.cfg, self.mesh)
    self.pad = model.pad_id
    self.calls = 0

  def _prompt_ids(self, record: Record) -> list[int]:
    return self.model.encode(render(record, self.model, self.schema, self.system_prompt)[0])

  def __call__(self, records: Sequence[Record]) -> list[int]:
    from tpu_reason import rewards
    from tpu_reason.sampling import batched

    # One call, one batch of `batch_size` rows (filler copies of the first prompt keep the shape fixed),
    # keyed by the call count; on a TPU mesh each chip decodes its own rows.
    comps = batched.generate_texts(self.model, self.params, [self._prompt_ids(r) for r in records], self.schema,
                                   sampling=self.sampling, k=self.k, batch_size=self.batch_size, fill=True,
                                   first_batch=self.calls, mesh=self.mesh)
    self.calls += -(-len(records) // self.batch_size)
    n = len(records) * self.k  # rows are prompt-major: prompt b's samples are rows b*k .. b*k+k-1
    texts = comps.texts
    answers = [r.answer for r in records for _ in range(self.k)]
    hits = rewards.outcome_reward([""] * n, texts, schema=self.schema, answer=answers)
    return [int(sum(hits[i * self.k : (i + 1) * self.k])) for i in range(len(records))]
