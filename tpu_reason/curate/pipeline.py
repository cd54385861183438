"""`run(cfg)`: candidate pool -> quality -> fit -> difficulty -> diversity -> curated set + report.

Fit (the training shapes, never truncating) runs before difficulty: it is cheap
and deterministic, so no generation is spent on rows that could not be trained
on, and the diversity stage samples only rows that will all be kept, so the set
has exactly the requested size. Everything but the baseline generations is
recomputed on a rerun; those come from the difficulty cache.

Outputs in the output directory (default `runs/<name>-curate`, fixed so the same
command resumes): curated.jsonl (the canonical teacher JSONL), report.json,
report.png, fates.jsonl (every pool row's stage and reason), difficulty_cache.jsonl,
config.yaml.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence

from tpu_reason import config_io, mesh as mesh_lib, models, runs, tags
from tpu_reason.config import Config
from tpu_reason.curate import difficulty, diversity, quality
from tpu_reason.curate.report import CurateReport, StageCount, length_summary, plot
from tpu_reason.data import stats
from tpu_reason.data.examples import Fit, fit_records
from tpu_reason.data.prepare import GENERATED_SOURCES, check_task, load_records
from tpu_reason.data.sources import Record, records_to_teacher_jsonl
from tpu_reason.errors import UserError


def load_pool(cfg: Config) -> tuple[list[Record], StageCount, str]:
  """(records, the load stage's counts, a source description); bad rows are counted, never raised."""
  data = dataclasses.replace(cfg.data, strict=False)
  tasks = cfg.curate.tasks
  if tasks and data.source not in GENERATED_SOURCES:
    raise UserError(f"curate.tasks pools reasoning-gym tasks; data.source={data.source} reads data.path")
  for task in tasks:
    check_task(task, "curate.tasks")
  parts = [dataclasses.replace(data, task=t) for t in tasks] if tasks else [data]
  records, seen, dropped, names = [], 0, collections.Counter(), []
  for part in parts:
    got, loaded = load_records(part, seed=part.seed, size=part.size)
    records += got
    seen += loaded.seen
    dropped.update(loaded.dropped)
    names.append(loaded.source)
  return records, StageCount("load", seen, len(records), dict(dropped)), " + ".join(names)


class Ledger:
  """Every pool row's fate, set exactly once ("stage:reason" or "selected"), and the rows per stratum after each stage."""

  def __init__(self, keys: Sequence[str], load: StageCount):
    self.keys = list(keys)
    self.fates: list[str | None] = [None] * len(keys)
    self.stages = [load]
    self.by_stratum = {"load": collections.Counter(keys)}

  def _set(self, row: int, fate: str):
    assert self.fates[row] is None, f"row {row} already {self.fates[row]}, now {fate}"
    self.fates[row] = fate

  def apply(self, stage: str, alive: Sequence[int], verdicts: Sequence[str | None]) -> list[int]:
    """The rows of `alive` a stage kept; the others get their fate."""
    assert len(verdicts) == len(alive), (stage, len(verdicts), len(alive))
    kept, dropped = [], collections.Counter()
    for row, verdict in zip(alive, verdicts):
      if verdict is None:
        kept.append(row)
      else:
        self._set(row, f"{stage}:{verdict}")
        dropped[verdict] += 1
    self.stages.append(StageCount(stage, len(alive), len(kept), dict(sorted(dropped.items()))))
    self.by_stratum[stage] = collections.Counter(self.keys[i] for i in kept)
    return kept

  def finish(self, selected: Sequence[int]):
    for row in selected:
      self._set(row, "selected")
    assert all(f is not None for f in self.fates), "a pool row has no fate"

  def strata(self, quotas: dict[str, int]) -> dict[str, dict[str, int]]:
    """{stratum: {stage: rows left after it, "quota": rows asked for}}."""
    return {key: {**{stage: n.get(key, 0) for stage, n in self.by_stratum.items()}, "quota": quotas.get(key, 0)}
            for key in sorted(self.by_stratum["load"])}


def _solver_factory(cfg: Config, train_model, schema):
  """make_solver(spec) for the difficulty stage; reuses the already loaded model when it is a baseline."""
  c = cfg.curate

  def make_solver(spec: str) -> difficulty.Solver:
    model = train_model if spec == cfg.model.spec else models.load(spec)
    return difficulty.ModelSolver(model, schema, system_prompt=cfg.data.system_prompt, sampling=c.sampling, k=c.k,
                                  batch_size=c.batch_size, mesh=mesh_lib.make_mesh(cfg.mesh))

  return make_solver


def settings(cfg: Config) -> str:
  """The difficulty cache's settings key: everything that changes a solved count except the question."""
  c, d = cfg.curate, cfg.data
  s = c.sampling
  return difficulty.settings_key({"k": c.k, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                                  "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed, "schema": d.schema,
                                  "system_prompt": d.system_prompt})


def run(cfg: Config, make_solver=None) -> CurateReport:
  """Curates `cfg.data`'s pool per `cfg.curate`; `make_solver(spec)` replaces the baseline models (tests)."""
  c, d = cfg.curate, cfg.data
  out = cfg.resolved_output_dir("curate", timestamp=False)  # no timestamp: rerunning resumes
  # a training run's or another command's directory is refused, and nothing is written before the pool loads
  runs.check_output(out, "output_dir", ("config.yaml", difficulty.CACHE_FILE, "report.json", "curated.jsonl"))
  schema = tags.get_schema(d.schema)
  seconds, t0 = {}, time.perf_counter()

  def lap(name: str):
    nonlocal t0
    seconds[name] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()

  pool, load_stage, source = load_pool(cfg)
  config_io.save(cfg, out)
  keys, field = diversity.strata(pool, c.strata)
  ledger = Ledger(keys, load_stage)
  lap("load")

  alive = ledger.apply("quality", range(len(pool)), quality.verdicts(
    pool, schema, require_trace=c.require_trace, near_dup_threshold=c.near_dup_threshold))
  lap("quality")

  model = models.load(cfg.model.spec)
  fits = list(fit_records([pool[i] for i in alive], model, schema, system_prompt=d.system_prompt,
                          max_prompt_tokens=d.max_prompt_tokens, max_completion_tokens=d.max_completion_tokens,
                          buckets=d.completion_buckets))
  fit_of = dict(zip(alive, fits))
  alive = ledger.apply("fit", alive, [f.reason for f in fits])
  lap("fit")

  cache = difficulty.ScoreCache(out / difficulty.CACHE_FILE)
  verdicts, solved_by, baselines = difficulty.verdicts(
    [pool[i] for i in alive], [keys[i] for i in alive], c.baselines,
    make_solver or _solver_factory(cfg, model, schema), cache, settings(cfg),
    k=c.k, max_solved=c.max_solved, batch_size=c.batch_size)
  solved_of = dict(zip(alive, solved_by))
  alive = ledger.apply("difficulty", alive, verdicts)
  lap("difficulty")

  verdicts, quotas = diversity.verdicts([keys[i] for i in alive], c.target_size, c.seed)
  alive = ledger.apply("diversity", alive, verdicts)
  ledger.finish(alive)
  lap("diversity")

  traces = stats.trace_lengths(model.tokenizer, [(pool[i].reasoning, pool[i].answer) for i in alive])
  rows = [{"id": pool[i].id, "stratum": keys[i], "prompt_tokens": fit_of[i].prompt_len,
           "completion_tokens": fit_of[i].completion_len, "reasoning_tokens": t.reasoning,
           "answer_tokens": t.answer, "ratio": round(t.ratio, 4), "solved": solved_of[i]}
          for i, t in zip(alive, traces)]
  report = CurateReport(source, load_stage.seen, c.target_size, ledger.stages, field, ledger.strata(quotas),
                        [dataclasses.asdict(b) for b in baselines], _lengths(cfg, fits, rows),
                        stats.ratio_summary(traces), rows, seconds)
  assert report.accounted, report.stages
  _write(out, report, [pool[i] for i in alive], pool, ledger)
  return report


def _lengths(cfg: Config, fits: Sequence[Fit], rows: Sequence[dict]) -> dict[str, dict]:
  """Token-length distributions of the rows the fit stage tokenized and of the curated rows."""
  d = cfg.data
  tokenized = [f for f in fits if f.prompt_len is not None]
  return {
    "after_quality/prompt": length_summary([f.prompt_len for f in tokenized], d.max_prompt_tokens),
    "after_quality/completion": length_summary([f.completion_len for f in tokenized], d.max_completion_tokens),
    **{f"curated/{part}": length_summary([r[f"{part}_tokens"] for r in rows], limit)
       for part, limit in (("prompt", d.max_prompt_tokens), ("completion", d.max_completion_tokens),
                           ("reasoning", d.max_completion_tokens), ("answer", d.max_completion_tokens))},
  }


def _write(out: pathlib.Path, report: CurateReport, selected: Sequence[Record], pool: Sequence[Record],
           ledger: Ledger):
  """curated.jsonl, fates.jsonl, report.png and report.json (last: its presence means the run finished)."""
  outputs = {"curated": out / "curated.jsonl", "fates": out / "fates.jsonl", "plot": out / "report.png",
             "report": out / "report.json", "cache": out / difficulty.CACHE_FILE}
  records_to_teacher_jsonl(selected, outputs["curated"])
  with open(outputs["fates"], "w", encoding="utf-8") as f:
    for record, key, fate in zip(pool, ledger.keys, ledger.fates):
      f.write(json.dumps({"id": record.id, "stratum": key, "fate": fate}) + "\n")
  plot(report, outputs["plot"])
  report.outputs = {k: str(v) for k, v in outputs.items()}
  report.save(outputs["report"])
