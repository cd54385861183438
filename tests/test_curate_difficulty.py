"""Tests for tpu_reason.curate.difficulty: solve counts, the resumable cache, the model solver."""

import json

import numpy as np
import pytest

from tpu_reason import models, tags
from tpu_reason.config import SamplingCfg
from tpu_reason.curate import difficulty
from tpu_reason.curate.difficulty import ScoreCache
from tpu_reason.data.sources import Record
from tpu_reason.sampling import sampler

SCHEMA = tags.get_schema("reasoning")


def _records(n: int) -> list[Record]:
  return [Record(f"q{i}", f"What is {i} + 1?", "", str(i + 1), (), "abc"[i % 3]) for i in range(n)]


class FakeSolver:
  """Solves question i in (i % 3) samples; logs every question it is asked."""

  def __init__(self, log: list, fail_after: int | None = None):
    self.log, self.fail_after, self.calls = log, fail_after, 0

  def __call__(self, records):
    if self.fail_after is not None and self.calls == self.fail_after:
      raise KeyboardInterrupt  # a kill between two batches
    self.calls += 1
    self.log += [r.id for r in records]
    return [int(r.id[1:]) % 3 for r in records]


def test_cache_round_trip_and_torn_tail(tmp_path):
  path = tmp_path / "cache.jsonl"
  cache = ScoreCache(path)
  cache.add("m", "s", {"a": 1, "b": 0})
  assert ScoreCache(path).get("m", "s", "a") == 1 and ScoreCache(path).get("m", "other", "a") is None
  with open(path, "a") as f:
    f.write('{"model": "m", "settings": "s", "quest')  # killed mid-line
  reopened = ScoreCache(path)
  assert reopened.get("m", "s", "b") == 0
  reopened.add("m", "s", {"c": 2})
  lines = path.read_text().splitlines()
  assert [json.loads(line)["question"] for line in lines] == ["a", "b", "c"]


def test_question_and_settings_keys():
  a, b = _records(2)
  assert difficulty.question_key(a) == difficulty.question_key(Record("other id", a.prompt, "x", a.answer, (), "z"))
  assert difficulty.question_key(a) != difficulty.question_key(b)
  assert difficulty.settings_key({"k": 2, "t": 0.7}) == difficulty.settings_key({"t": 0.7, "k": 2})
  assert difficulty.settings_key({"k": 2}) != difficulty.settings_key({"k": 4})


def test_only_uncached_questions_reach_the_solver(tmp_path):
  records, log = _records(7), []
  cache = ScoreCache(tmp_path / "c.jsonl")
  made = []

  def make():
    made.append(1)
    return FakeSolver(log)

  counts, generated = difficulty.score_questions(records[:3], make, cache, "m", "s", batch_size=2)
  assert counts == [0, 1, 2] and generated == 3 and log == ["q0", "q1", "q2"]
  counts, generated = difficulty.score_questions(records, make, cache, "m", "s", batch_size=2)
  assert counts == [0, 1, 2, 0, 1, 2, 0] and generated == 4
  assert log == ["q0", "q1", "q2", "q3", "q4", "q5", "q6"] and len(made) == 2
  # everything cached: the solver (the model) is never even built
  assert difficulty.score_questions(records, make, cache, "m", "s", 2) == (counts, 0) and len(made) == 2
  # other settings or another model: scored afresh
  assert difficulty.score_questions(records[:2], make, cache, "m", "s2", 2)[1] == 2
  assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 9


def test_interrupted_scoring_resumes_without_repeating_a_question(tmp_path):
  records, log = _records(9), []
  cache = ScoreCache(tmp_path / "c.jsonl")
  with pytest.raises(KeyboardInterrupt):
    difficulty.score_questions(records, lambda: FakeSolver(log, fail_after=2), cache, "m", "s", 2)
  assert log == ["q0", "q1", "q2", "q3"]
  counts, generated = difficulty.score_questions(records, lambda: FakeSolver(log), ScoreCache(cache.path), "m",
                                                 "s", 2)
  assert generated == 5 and sorted(log) == [f"q{i}" for i in range(9)]  # each question generated exactly once
  assert counts == [i % 3 for i in range(9)]


def test_verdicts_cull_what_any_baseline_solves_too_often(tmp_path):
  records, logs = _records(9), {"m1": [], "m2": []}
  strata = [r.domain for r in records]

  def make(spec):
    solver = FakeSolver(logs[spec])
    if spec == "m2":  # m2 solves everything once
      return lambda batch: [max(1, n) for n in solver(batch)]
    return solver

  cache = ScoreCache(tmp_path / "c.jsonl")
  out, solved, stats = difficulty.verdicts(records, strata, ["m1", "m2"], make, cache, "s", k=2, max_solved=1,
                                           batch_size=4)
  # m1 solves q2, q5, q8 in 2/2 samples > 1: too easy, and never posed to m2
  assert out == [None, None, "too_easy"] * 3
  assert len(logs["m1"]) == 9 and sorted(logs["m2"]) == ["q0", "q1", "q3", "q4", "q6", "q7"]
  assert solved[2] == {"m1": 2} and solved[0] == {"m1": 0, "m2": 1}
  s1, s2 = stats
  assert (s1.posed, s1.generated, s1.cached, s1.too_easy, s1.solved_any) == (9, 9, 0, 3, 6)
  assert s1.mean_solve_rate == pytest.approx(1 / 2)
  assert s1.solve_rate_by_stratum == {"a": 0.0, "b": 0.5, "c": 1.0}
  assert (s2.posed, s2.too_easy, s2.solved_any) == (6, 0, 6)
  # max_solved=0: solved by none
  out0, _, _ = difficulty.verdicts(records, strata, ["m1"], make, cache, "s", k=2, max_solved=0, batch_size=4)
  assert out0 == [None, "too_easy", "too_easy"] * 3
  assert len(logs["m1"]) == 9  # all cached


@pytest.mark.slow
def test_model_solver_counts_hits_per_prompt_ignoring_filler_rows(monkeypatch):
  model = models.load("tiny-llama")
  records = _records(3)
  solver = difficulty.ModelSolver(model, SCHEMA, system_prompt="", sampling=SamplingCfg(max_new_tokens=4,
                                  temperature=0.7), k=3, batch_size=4)
  seen = {}

  def fake_generate(params, cfg, tokenizer, tokens, mask, *, group, **kw):
    seen["shape"], seen["group"] = tokens.shape, group
    # prompt-major rows: prompt b's samples are rows 3b..3b+2; prompt b is answered right in b samples
    texts = []
    for b in range(tokens.shape[0]):
      for g in range(group):
        answer = str(b + 1) if g < b else "wrong"
        texts.append(f"x\n</reasoning>\n<answer>\n{answer}\n</answer>")
    return sampler.Generation(np.zeros((len(texts), 1), np.int32), np.ones(len(texts), np.int32),
                              np.ones(len(texts), bool), texts, 0.0)

  monkeypatch.setattr(sampler, "generate", fake_generate)
  assert solver(records) == [0, 1, 2]
  assert seen["shape"][0] == 4 and seen["group"] == 3  # padded to the batch size
  longest = max(len(solver._prompt_ids(r)) for r in records)
  assert seen["shape"][1] == sampler.prompt_width(longest)


@pytest.mark.slow
def test_model_solver_runs_a_real_model_at_one_shape():
  model = models.load("tiny-llama")
  records = _records(5)
  solver = difficulty.ModelSolver(model, SCHEMA, system_prompt="Think.", sampling=SamplingCfg(max_new_tokens=3,
                                  temperature=0.7), k=2, batch_size=3)
  first = solver(records[:3])
  compiled = (sampler.prefill._cache_size(), sampler.start._cache_size(), sampler.decode._cache_size())
  second = solver(records[3:])  # a partial batch: same shapes, no new compile
  assert (sampler.prefill._cache_size(), sampler.start._cache_size(), sampler.decode._cache_size()) == compiled
  assert len(first) == 3 and len(second) == 2
  assert all(0 <= n <= 2 for n in first + second)


def test_questions_go_to_the_solver_shortest_first(tmp_path):
  records = [Record(f"q{i}", "x" * n, "", "1", (), "a") for i, n in enumerate((30, 10, 20, 5))]
  batches = []

  def solve(batch):
    batches.append([r.id for r in batch])
    return [0] * len(batch)

  counts, _ = difficulty.score_questions(records, lambda: solve, ScoreCache(tmp_path / "c.jsonl"), "m", "s", 2)
  assert batches == [["q3", "q1"], ["q2", "q0"]] and counts == [0, 0, 0, 0]
