"""Tests for tpu_reason.curate (pipeline, report, CLI): exact counts per stage on a fixed pool; kill and rerun."""

import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from tests.conftest import one_device_env
from tpu_reason import config_io, models, tags
from tpu_reason.config import Config
from tpu_reason.curate import pipeline
from tpu_reason.data.examples import build_examples
from tpu_reason.data.sources import load_teacher

pytestmark = pytest.mark.slow  # the curate CLI as subprocesses

ROOT = pathlib.Path(__file__).resolve().parent.parent
LONG = ("A farmer has 3 fields and plants 4 rows of corn in each field; every row gives 25 cobs and"
        " he sells each cob for 2 dollars at the market on Saturday. How much money does he make?")
GOOD = {  # domain -> (prompt, answer); answers starting with "1" are the ones the fake baseline solves
  "arith": [(LONG, "600"), ("What is 7 * 8?", "56"), ("What is 9 - 4?", "5"), ("What is 6 / 3?", "2"),
            ("What is 5 + 5?", "10"), ("What is 3 * 4?", "12")],
  "words": [("Spell cat backwards.", "tac"), ("How many vowels are in banana?", "3"),
            ("Which letter follows q?", "r"), ("How many times does 'a' occur in 'cat'?", "1")],
  "geo": [("How many sides does a hexagon have?", "6"), ("How many degrees in a right angle?", "90")],
}


def _row(prompt, answer, domain="arith", reasoning="Work it out step by step.", checkpoints=()):
  chosen = f"<reasoning>{reasoning}</reasoning><answer>{answer}</answer>"
  return json.dumps({"prompt": prompt, "chosen": chosen, "domain": domain,
                     "metadata": {"final_answer": answer, "checkpoints": list(checkpoints)}})


def write_pool(path: pathlib.Path) -> pathlib.Path:
  """22 input rows whose fate is known: 3 unreadable, 5 low quality, 2 too long, 3 too easy, 9 left."""
  lines = [
    '{"prompt": "broken',  # load: malformed_json
    json.dumps({"chosen": "<reasoning>x</reasoning>", "metadata": {"final_answer": "1"}}),  # load: missing_field
    json.dumps({"prompt": "No tags?", "chosen": "just text", "metadata": {"final_answer": "1"}}),  # no_reasoning_tag
  ]
  for domain, rows in GOOD.items():
    lines += [_row(p, a, domain) for p, a in rows]
  lines += [
    _row("What is 1 + 1?", "."),  # quality: no_answer
    _row("What is 2 + 2?", "4", reasoning="so <answer> 4"),  # quality: unparsable_trace
    _row("What is 2 * 3?", "6", reasoning="two threes are six", checkpoints=["2*3=6"]),  # missing_checkpoints
    _row("what is 7*8", "56"),  # quality: duplicate of "What is 7 * 8?"
    _row(LONG.replace("Saturday", "Sunday"), "600"),  # quality: near_duplicate
    _row("Count: " + "one two three " * 40 + "stop.", "40", "words"),  # fit: prompt_too_long
    _row("What is 2 + 3?", "5", "geo", reasoning="and then " * 60),  # fit: completion_too_long
  ]
  path.write_text("\n".join(lines) + "\n")
  return path


def _cfg(tmp_path, **curate) -> Config:
  overrides = [f"output_dir={tmp_path / 'out'}", "model.spec=tiny-llama", "data.source=teacher",
               f"data.path={write_pool(tmp_path / 'pool.jsonl')}", "data.system_prompt=",
               "data.max_prompt_tokens=96", "data.max_completion_tokens=64", "data.completion_buckets=[]",
               "curate.baselines=[base]", "curate.k=2", "curate.max_solved=1", "curate.target_size=6",
               "curate.batch_size=4"]
  return config_io.load(Config, None, overrides + [f"curate.{k}={v}" for k, v in curate.items()])


def fake_baseline(log: list):
  """make_solver for run(): "solves" (2 of 2) answers starting with 1; logs every question posed."""
  def make(spec):
    def solve(batch):
      log.extend(r.prompt for r in batch)
      return [2 if r.answer.startswith("1") else 0 for r in batch]
    return solve
  return make


EXPECTED_STAGES = [
  ("load", 22, 19, {"malformed_json": 1, "missing_field": 1, "no_reasoning_tag": 1}),
  ("quality", 19, 14, {"duplicate": 1, "missing_checkpoints": 1, "near_duplicate": 1, "no_answer": 1,
                       "unparsable_trace": 1}),
  ("fit", 14, 12, {"completion_too_long": 1, "prompt_too_long": 1}),
  ("difficulty", 12, 9, {"too_easy": 3}),
  ("diversity", 9, 6, {"over_quota": 3}),
]


def test_every_row_is_accounted_for_once_with_exact_counts(tmp_path):
  log = []
  report = pipeline.run(_cfg(tmp_path), make_solver=fake_baseline(log))
  assert [(s.name, s.seen, s.kept, s.dropped) for s in report.stages] == EXPECTED_STAGES
  assert report.accounted and report.selected == 6 and report.input_rows == 22
  assert len(log) == 12  # every question that reached the difficulty stage, once
  assert report.strata_field == "domain"
  assert report.strata == {
    "arith": {"load": 11, "quality": 6, "fit": 6, "difficulty": 4, "diversity": 2, "quota": 2},
    "geo": {"load": 3, "quality": 3, "fit": 2, "difficulty": 2, "diversity": 2, "quota": 2},
    "words": {"load": 5, "quality": 5, "fit": 4, "difficulty": 3, "diversity": 2, "quota": 2},
  }
  (base,) = report.baselines
  assert (base["posed"], base["generated"], base["cached"], base["too_easy"]) == (12, 12, 0, 3)
  assert base["solve_rate_by_stratum"] == {"arith": 1 / 3, "geo": 0.0, "words": 0.25}

  out = tmp_path / "out"
  fates = [json.loads(line) for line in (out / "fates.jsonl").read_text().splitlines()]
  assert len(fates) == 19  # every parsed row, each with one fate
  counts = collections.Counter(f["fate"] for f in fates)
  assert counts["selected"] == 6 and counts["difficulty:too_easy"] == 3 and counts["diversity:over_quota"] == 3
  assert counts["quality:near_duplicate"] == 1 and counts["fit:prompt_too_long"] == 1

  saved = json.loads((out / "report.json").read_text())
  assert saved["accounted"] is True and saved["selected"] == 6
  assert [r["id"] for r in saved["rows"]] == [f["id"] for f in fates if f["fate"] == "selected"]
  assert all(r["ratio"] == pytest.approx(r["reasoning_tokens"] / r["answer_tokens"], abs=1e-4) for r in saved["rows"])
  assert saved["ratio"]["n"] == 6 and saved["lengths"]["curated/prompt"]["n"] == 6
  assert (out / "report.png").stat().st_size > 10_000

  curated, loaded = load_teacher(out / "curated.jsonl")
  assert loaded.kept == 6 and collections.Counter(r.domain for r in curated) == {"arith": 2, "geo": 2, "words": 2}
  assert not any(r.answer.startswith("1") for r in curated)  # nothing the baseline solved
  # fit: every curated row trains at the configured shapes, none truncated
  model = models.load("tiny-llama")
  examples, fit = build_examples(curated, model, tags.get_schema("reasoning"), max_prompt_tokens=96,
                                 max_completion_tokens=64)
  assert fit.kept == 6 and not fit.dropped

  table = report.table()
  assert "input rows 22 = 6 selected + 16 dropped (adds up)" in table
  assert "difficulty       12      9  too_easy=3" in table


def test_rerun_reuses_every_baseline_score(tmp_path):
  cfg, log = _cfg(tmp_path), []
  first = pipeline.run(cfg, make_solver=fake_baseline(log))
  second = pipeline.run(cfg, make_solver=fake_baseline(log))
  assert len(log) == 12 and second.baselines[0]["cached"] == 12 and second.baselines[0]["generated"] == 0
  assert first.rows == second.rows


def test_interrupted_difficulty_stage_resumes_where_it_stopped(tmp_path):
  cfg, log = _cfg(tmp_path), []

  def dies_after_two_batches(spec):
    solve = fake_baseline(log)(spec)
    calls = []

    def wrapped(batch):
      if len(calls) == 2:
        raise KeyboardInterrupt
      calls.append(1)
      return solve(batch)
    return wrapped

  with pytest.raises(KeyboardInterrupt):
    pipeline.run(cfg, make_solver=dies_after_two_batches)
  assert len(log) == 8
  report = pipeline.run(cfg, make_solver=fake_baseline(log))
  assert len(log) == 12 and len(set(log)) == 12  # the last 4 questions only
  assert report.baselines[0]["cached"] == 8 and report.accounted


def test_no_baselines_skips_the_difficulty_stage_and_keywords_strata(tmp_path):
  report = pipeline.run(_cfg(tmp_path, baselines="[]", strata="keywords", target_size=100))
  assert [(s.name, s.seen, s.kept) for s in report.stages][3:] == [("difficulty", 12, 12), ("diversity", 12, 12)]
  assert report.strata_field == "keywords" and report.accounted and report.baselines == []


def test_curate_tasks_needs_reasoning_gym(tmp_path):
  from tpu_reason.errors import UserError

  with pytest.raises(UserError, match="curate.tasks"):
    pipeline.run(_cfg(tmp_path, tasks="[gsm_symbolic]"))


# ---------------------------------------------------------------------- CLI


def _cli(out: pathlib.Path, *extra: str) -> subprocess.Popen:
  args = [sys.executable, "-m", "tpu_reason.curate", f"output_dir={out}", "curate.baselines=[tiny-llama]",
          "curate.tasks=[leg_counting,basic_arithmetic,chain_sum]", "data.size=6", "curate.k=2",
          "curate.sampling.max_new_tokens=4", "curate.batch_size=2", "curate.target_size=9", *extra]
  env = one_device_env(HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))  # a user's one device, tiny-model compiles
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cache_lines(out: pathlib.Path) -> list[dict]:
  path = out / "difficulty_cache.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().split("\n")[:-1]]  # whole lines only, as ScoreCache reads


def test_cli_killed_during_difficulty_then_rerun_never_regenerates(tmp_path):
  out = tmp_path / "run"
  proc = _cli(out)
  deadline = time.monotonic() + 600
  while not _cache_lines(out) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)  # mid-stage: the first batch is scored, later ones are not
  proc.communicate()
  before = _cache_lines(out)
  assert before, "the first run never reached the difficulty stage"
  assert not (out / "report.json").exists(), "the first run finished before it was killed"

  rerun = _cli(out)
  stdout, stderr = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, stderr
  after = _cache_lines(out)
  report = json.loads((out / "report.json").read_text())
  (base,) = report["baselines"]
  keys = [row["question"] for row in after]
  assert len(keys) == len(set(keys)) == base["posed"]  # each question generated exactly once over both runs
  assert base["cached"] == len(before) and base["generated"] == base["posed"] - len(before)
  assert after[: len(before)] == before
  assert report["accounted"] and report["input_rows"] == 18 and report["selected"] == 9
  assert f"posed {base['posed']} (cached {len(before)}, generated {base['generated']})" in stdout
  assert "adds up" in stdout


def test_cli_bad_input_is_one_line_error(tmp_path):
  proc = _cli(tmp_path / "x", "curate.k=0")
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2 and stderr.startswith("error:") and "Traceback" not in stderr
  assert len(stderr.strip().splitlines()) == 1 and "curate" in stderr
