"""Evaluation: scores of fixed completions against hand-computed values, k samples per prompt
(one prefill), eval.json / samples.jsonl, --compare, budget settings, redaction, the real model.

The score tests need no model. The CLI tests run the tiny random `tiny-llama` (real SmolLM2
tokenizer) on 4 rows with a few new tokens; one test runs the embedded SmolLM2-135M.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_run
from tpu_reason import config_io, eval as eval_cli, scoring, tags
from tpu_reason.config import Config, SamplingCfg
from tpu_reason.data.prepare import question_tokens, split_records
from tpu_reason.sampling import sampler

REASONING = tags.get_schema("reasoning")
FIXTURES = Path(__file__).parent / "fixtures"

# Two prompts, three samples each (prompt-major), with every reward worked out by hand.
GOLDS = ["5", "17"]
CHECKPOINTS = [["2 + 3 = 5"], ["10 + 7 = 17"]]
TEXTS = [
    "<reasoning>\n2 + 3 = 5\n</reasoning>\n<answer>\n5\n</answer>",  # all right
    "<reasoning>\nhmm\n</reasoning>\n<answer>\n6\n</answer>",  # well formed, wrong
    "<reasoning>\n2 + 3 = 6\n</reasoning>\n<answer>\n6.0\n</answer>",  # wrong; votes with the one above
    "<reasoning>\n10 + 7 = 17",  # never closed: opened only, checkpoint present
    "<reasoning>\nx\n</reasoning>\n<answer>17</answer> extra",  # right, text after the answer
    "<reasoning>\nfine\n</reasoning>\n<answer>\nseventeen\n</answer>",  # well formed, not a number match
]
HAND = {
    "format": [1, 1, 1, 0.25, 0.75, 1],
    "format_soft": [1, 1, 1, 0, 1, 1],
    "process": [1, 0, 0, 1, 0, 0],
    "outcome": [1, 0, 0, 0, 1, 0],
}


def _rows():
  return [g for g in GOLDS for _ in range(3)], [c for c in CHECKPOINTS for _ in range(3)]


def test_score_rows_match_hand_checks():
  golds, ckpts = _rows()
  scores = scoring.score_rows(REASONING, TEXTS, golds, ckpts)
  assert set(scores) == set(HAND)
  for name, want in HAND.items():
    np.testing.assert_array_equal(scores[name], want, err_msg=name)


def test_summarize_matches_hand_checks():
  golds, ckpts = _rows()
  scores = scoring.score_rows(REASONING, TEXTS, golds, ckpts)
  answers = [REASONING.parse(t).answer for t in TEXTS]
  assert answers == ["5", "6", "6.0", None, "17", "seventeen"]
  unclosed = np.array([not REASONING.parse(t).closed_reasoning for t in TEXTS])
  m = scoring.summarize(scores, answers, GOLDS, 3, np.array([10, 20, 30, 40, 50, 60]), unclosed)
  assert m == pytest.approx({
      "n": 2, "k": 3,
      "accuracy": 2 / 6,
      "format_accuracy": 4 / 6,
      "pass@k": 1.0,  # each prompt has one right sample
      "maj@k": 0.5,  # prompt 0 votes 6 (twice, as "6" and "6.0"); prompt 1 ties 17 / seventeen -> first, 17
      "reward/format": 5 / 6, "reward/format_soft": 5 / 6, "reward/process": 2 / 6, "reward/outcome": 2 / 6,
      "mean_completion_tokens": 35.0,
      "unclosed_rate": 1 / 6,
  })


def test_score_texts_keeps_the_sft_keys():
  golds, ckpts = _rows()
  s = scoring.score_texts(REASONING, TEXTS, golds, ckpts)
  assert s["answer_accuracy"] == pytest.approx(2 / 6) and s["format_accuracy"] == pytest.approx(4 / 6)
  assert s["reward/process"] == pytest.approx(2 / 6) and s["unclosed_rate"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("answers, want", [
    (["6", "6.0", "5"], "6"),
    (["5", None, "6"], "5"),  # tie: first seen
    ([None, " ", None], None),
    (["1,000", "1000", "999"], "1,000"),  # votes compare normalised answers
])
def test_majority(answers, want):
  assert scoring.majority(answers) == want


def test_pass_and_maj_at_k():
  assert scoring.pass_at_k(np.array([[0, 1], [0, 0], [1, 1]], bool)) == pytest.approx(2 / 3)
  assert scoring.maj_at_k([["4", "4", "5"], ["x", "7", "7"]], ["4", "8"]) == 0.5


# --------------------------------------------------------------------------- running models


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "held_out.jsonl"
  rows = [{"question": "What is 2 plus 3?", "answer": "5", "checkpoints": ["2 + 3 = 5"]},
          {"prompt": "What is 10 plus 7?", "answer": 17},
          {"question": "What is 4 times 4?", "answer": "16"},
          {"question": "What is 9 minus 1?", "answer": "8", "checkpoints": []}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


TINY_ARGS = ["sampling.max_new_tokens=6", "eval.batch_size=3", "eval.show=0", "data.system_prompt="]


def _run(tmp_path, rows_file, *args, model=("--model", "tiny-llama")):
  out = tmp_path / "out"
  eval_cli.main([*model, "--data", str(rows_file), "--out", str(out), *TINY_ARGS, *args])
  return out


def _samples(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_eval_writes_metrics_and_samples(tmp_path, rows_file, capsys):
  out = _run(tmp_path, rows_file)
  result = json.loads((out / "eval.json").read_text())
  for key in ("accuracy", "format_accuracy", "pass@k", "maj@k", "reward/format", "reward/format_soft",
              "reward/process", "reward/outcome", "mean_completion_tokens", "unclosed_rate"):
    assert 0 <= result[key] <= (6 if key == "mean_completion_tokens" else 1), key
  assert (result["n"], result["k"], result["model"]) == (4, 1, "tiny-llama")
  samples = _samples(out / "samples.jsonl")
  assert [s["gold"] for s in samples] == ["5", "17", "16", "8"]
  assert all(s["completion"].startswith("<reasoning>\n") and s["setting"] == "plain" for s in samples)
  assert "What is 10 plus 7?" in samples[1]["prompt"]  # `prompt` rows load like `question` rows
  golds, texts = [s["gold"] for s in samples], [s["completion"] for s in samples]
  scores = scoring.score_rows(REASONING, texts, golds, [["2 + 3 = 5"], [], [], []])
  for i, s in enumerate(samples):
    assert s["scores"] == {n: float(v[i]) for n, v in scores.items() if not np.isnan(v[i])}
    assert ("process" in s["scores"]) == (i == 0)  # only the first row has checkpoints
    assert s["answer"] == REASONING.parse(s["completion"]).answer
  assert result["mean_completion_tokens"] == pytest.approx(np.mean([s["tokens"] for s in samples]))
  assert result["accuracy"] == pytest.approx(np.mean(scores["outcome"]))
  table = capsys.readouterr().out
  assert "format_accuracy" in table and "pass@1" in table and "tiny-llama" in table


@pytest.mark.slow
def test_k_samples_share_one_prefill_per_prompt(tmp_path, rows_file, monkeypatch):
  calls = []
  real = sampler.generate

  def spy(params, cfg, tok, tokens, mask, **kw):
    calls.append((tokens.shape[0], kw["group"]))
    return real(params, cfg, tok, tokens, mask, **kw)

  monkeypatch.setattr(sampler, "generate", spy)
  out = _run(tmp_path, rows_file, "eval.k=3", "sampling.temperature=1.0", "eval.batch_size=4")
  assert calls == [(4, 3)]  # 4 prompts prefilled once, decoded 3 times each
  samples = _samples(out / "samples.jsonl")
  assert [s["sample"] for s in samples] == [0, 1, 2] * 4
  assert [s["gold"] for s in samples] == [g for g in ["5", "17", "16", "8"] for _ in range(3)]
  result = json.loads((out / "eval.json").read_text())
  correct = np.array([s["scores"]["outcome"] for s in samples]).reshape(4, 3)
  assert result["pass@k"] == pytest.approx(np.mean(correct.any(1)))
  assert len({s["completion"] for s in samples[:3]}) > 1  # sampled, not copies


@pytest.mark.slow
def test_equal_batches_cover_every_row_once(tmp_path, rows_file, monkeypatch):
  sizes = []
  real = sampler.generate
  monkeypatch.setattr(sampler, "generate", lambda *a, **kw: sizes.append(a[3].shape[0]) or real(*a, **kw))
  out = _run(tmp_path, rows_file, "eval.batch_size=3")
  assert sizes == [2, 2]  # 4 rows, at most 3 per call: two calls of 2, not 3 + 1
  assert len(_samples(out / "samples.jsonl")) == 4


@pytest.mark.slow
def test_redact_thoughts_keeps_answers_and_lengths_only(tmp_path, rows_file):
  plain = _samples(_run(tmp_path / "a", rows_file) / "samples.jsonl")
  redacted = _samples(_run(tmp_path / "b", rows_file, "redact_thoughts=true") / "samples.jsonl")
  assert [s["completion"] for s in redacted] == [REASONING.redact(s["completion"]) for s in plain]
  assert [(s["answer"], s["scores"]) for s in redacted] == [(s["answer"], s["scores"]) for s in plain]
  for p, r in zip(plain, redacted):
    reasoning = REASONING.parse(p["completion"]).reasoning
    assert f"[{len(reasoning)} chars of reasoning redacted]" in r["completion"]
    assert not reasoning or reasoning not in r["completion"]


@pytest.mark.slow
def test_repetition_guard_is_its_own_column(tmp_path, rows_file, capsys):
  out = _run(tmp_path, rows_file, "budget.repeat_ngram=1", "budget.repeat_window=32", "eval.batch_size=4",
             "sampling.max_new_tokens=32")
  result = json.loads((out / "eval.json").read_text())
  guarded = result["forced"]
  assert "mean_loop_closes" not in result and 0 < guarded["mean_loop_closes"] <= 1  # random weights loop
  assert guarded["unclosed_rate"] < result["unclosed_rate"]  # the plain column is the unguarded model
  samples = _samples(out / "samples.jsonl")
  assert {s["loop_closes"] for s in samples[4:]} <= {0, 1} and all("loop_closes" not in s for s in samples[:4])
  lines = capsys.readouterr().out.splitlines()
  assert ["tiny-llama", "tiny-llama+guard"] in [line.split() for line in lines]


@pytest.mark.slow
def test_budget_runs_plain_and_forced_side_by_side(tmp_path, rows_file, capsys):
  out = _run(tmp_path, rows_file, "budget.max_thinking_tokens=3", "budget.extend=1", "eval.batch_size=4",
                "sampling.max_new_tokens=16")
  result = json.loads((out / "eval.json").read_text())
  forced = result["forced"]
  assert forced["budget"] == {"max_thinking_tokens": 3, "extend": 1, "wait": "Wait", "repeat_ngram": 0,
                              "repeat_times": 3, "repeat_window": 256}
  assert "mean_thinking_tokens" not in result and forced["mean_thinking_tokens"] <= 3
  samples = _samples(out / "samples.jsonl")
  assert [s["setting"] for s in samples] == ["plain"] * 4 + ["forced"] * 4
  for s in samples[4:]:
    # a row capped after 3 thinking tokens carries the forced close and an answer opening
    assert s["forced_closes"] in (0, 1) and s["thinking_tokens"] <= 3
    if s["forced_closes"]:
      assert REASONING.answer_start in s["completion"]
  assert forced["mean_forced_closes"] == np.mean([s["forced_closes"] for s in samples[4:]])
  lines = capsys.readouterr().out.splitlines()
  assert ["tiny-llama", "tiny-llama+budget"] in [line.split() for line in lines]


@pytest.mark.slow
def test_compare_base_and_run_in_one_table(tmp_path, rows_file, tiny_run, capsys):
  run, _ = tiny_run
  out = _run(tmp_path, rows_file, model=("--compare", "tiny-llama", str(run)))
  both = json.loads((out / "compare.json").read_text())
  assert list(both["models"]) == ["tiny-llama", "tiny-run"]
  assert both["models"]["tiny-run"]["source"].endswith("checkpoints/best/1 on tiny-llama")
  base = _samples(out / "tiny-llama" / "samples.jsonl")
  tuned = _samples(out / "tiny-run" / "samples.jsonl")
  assert [s["prompt"] for s in base] == [s["prompt"] for s in tuned]
  assert [s["completion"] for s in base] != [s["completion"] for s in tuned]  # the LoRA is applied
  assert "lora:\n  rank: 4" in (out / "config.yaml").read_text()  # the run's config is the recipe
  lines = capsys.readouterr().out.splitlines()
  header = next(line for line in lines if "tiny-run" in line and "tiny-llama" in line)
  assert header.split() == ["tiny-llama", "tiny-run"]
  assert sum(line.startswith("accuracy") for line in lines) == 1


@pytest.mark.parametrize("args, message", [
    (["eval.k=2"], "samples of greedy decoding are identical"),
    (["--compare", "tiny-llama"], "--compare needs two or more models"),
    (["--compare", "tiny-llama", "eval.k=1"], "--compare needs two or more models"),  # an override is no model
    (["--model", "tiny-llama", "--compare", "a", "b"], "give one model"),
    (["data.path=/nope.jsonl"], "data.path not found"),
])
def test_bad_input_is_one_error_line(tmp_path, rows_file, args, message, capsys):
  with pytest.raises(SystemExit) as e:
    eval_cli.main(["--data", str(rows_file), "--out", str(tmp_path), *args])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.slow
def test_generate_and_score_keeps_sft_contract(smollm2_tiny_batch):
  model, params, examples = smollm2_tiny_batch
  scores, texts = scoring.generate_and_score(model, params, examples, REASONING, max_new_tokens=4)
  assert len(texts) == len(examples) and all(t.startswith(REASONING.primer) for t in texts)
  assert {"format_accuracy", "answer_accuracy", "mean_completion_tokens"} <= set(scores)
  assert scores["mean_completion_tokens"] <= 4


@pytest.fixture(scope="module")
def smollm2_tiny_batch(smollm2, rows_file):
  import jax

  from tpu_reason.data.sources import load_table

  records, _ = load_table(rows_file)
  examples = scoring.prompt_examples(records, smollm2, REASONING, "")
  return smollm2, jax.tree.map(np.asarray, smollm2.params), examples


@pytest.mark.slow
def test_embedded_model_eval_greedy_matches_direct_generation(smollm2_tiny_batch, tmp_path, rows_file):
  """The real SmolLM2: the CLI's greedy completions are the sampler's, scored by the rewards."""
  model, params, examples = smollm2_tiny_batch
  out = _run(tmp_path, rows_file, "sampling.max_new_tokens=24", "eval.batch_size=4",
             model=("--model", "smollm2-135m"))
  samples = _samples(out / "samples.jsonl")
  tokens = np.stack([e.prompt_tokens_P for e in examples])
  mask = np.stack([e.prompt_mask_P for e in examples])
  gen = sampler.generate(params, model.cfg, model.tokenizer, tokens, mask, eos_ids=model.eos_ids,
                         pad_id=model.pad_id, sampling=SamplingCfg(max_new_tokens=24),
                         stop_strings=REASONING.stop_strings)
  assert [s["completion"] for s in samples] == [REASONING.primer + t for t in gen.texts]
  assert [s["tokens"] for s in samples] == gen.lengths.tolist()
  result = json.loads((out / "eval.json").read_text())
  assert result["unclosed_rate"] == np.mean([not REASONING.parse(s["completion"]).closed_reasoning for s in samples])


# --------------------------------------------------------------------------- rows and models from the CLI


@pytest.mark.slow
def test_compare_three_models_in_one_table(tmp_path, rows_file, tiny_run, capsys):
  run_a, _ = tiny_run
  run_b, _ = write_run(tmp_path / "tiny-run-b", seed=1)
  out = _run(tmp_path, rows_file, model=("--compare", "tiny-llama", str(run_a), str(run_b)))
  models = json.loads((out / "compare.json").read_text())["models"]
  assert list(models) == ["tiny-llama", "tiny-run", "tiny-run-b"]
  completions = [[s["completion"] for s in _samples(out / name / "samples.jsonl")] for name in models]
  assert len({tuple(c) for c in completions}) == 3  # three different models, each on the same 4 rows
  lines = capsys.readouterr().out.splitlines()
  header = next(line for line in lines if "tiny-run-b" in line)
  assert header.split() == ["tiny-llama", "tiny-run", "tiny-run-b"]
  accuracy = next(line for line in lines if line.startswith("accuracy"))
  assert accuracy.split()[1:] == [f"{models[m]['accuracy']:.3f}" for m in models]


def test_markdown_table_has_a_column_per_model():
  columns = {"base": {"model": "x", "n": 4, "accuracy": 0.25, "forced": {}}, "sft": {"n": 4, "accuracy": 0.5}}
  lines = eval_cli.markdown_table(columns).splitlines()
  assert lines[:2] == ["| | base | sft |", "|---|---|---|"]
  assert lines[2:] == ["| n | 4 | 4 |", "| accuracy | 0.250 | 0.500 |"]  # ROWS order; no text or nested values


@pytest.mark.parametrize("fixture, kind", [("gsm8k.jsonl", "gsm8k"), ("teacher.jsonl", "teacher"),
                                           ("s1k.jsonl", "s1k"), ("dolphin_r1.jsonl", "dolphin_r1")])
def test_data_file_layout_is_recognised(fixture, kind):
  rest, specs, data_file = eval_cli.split_args(["--data", str(FIXTURES / fixture), "--model", "m"])
  assert f"data.source={kind}" in rest and f"data.path={FIXTURES / fixture}" in rest
  assert specs == ["m"] and data_file


def test_data_file_layout_yields_to_an_explicit_source(rows_file):
  assert "data.source=jsonl" in eval_cli.split_args(["--data", str(rows_file)])[0]  # plain question/answer rows
  rest, _, _ = eval_cli.split_args(["data.source=jsonl", "--data", str(FIXTURES / "gsm8k.jsonl")])
  assert [a for a in rest if a.startswith("data.source=")] == ["data.source=jsonl"]


@pytest.mark.slow
def test_gsm8k_file_scores_the_number_after_the_hashes(tmp_path):
  out = _run(tmp_path, FIXTURES / "gsm8k.jsonl")
  samples = _samples(out / "samples.jsonl")
  # the number after "####", not the worked solution; the row without "####" is dropped as GSM8K's loader does
  assert [s["gold"] for s in samples] == ["72", "10", "5000"]


def _teacher_row(row_id: str, prompt: str, answer: str) -> dict:
  chosen = f"<reasoning>{prompt} so {answer}</reasoning><answer>{answer}</answer>"
  return {"id": row_id, "prompt": prompt, "chosen": chosen, "metadata": {"final_answer": answer}}


@pytest.fixture
def leaky_file(tmp_path):
  """A teacher file whose held-out tail repeats training rows: by id, and by question up to case and punctuation."""
  rows = [_teacher_row(f"r{i}", f"What is {i} plus {i}?", str(2 * i)) for i in range(8)]
  rows += [_teacher_row("copy-of-r1", "what is 1 PLUS 1", "2"),  # another id, the same normalised question
           _teacher_row("r2", "What is two plus two?", "4"),  # a training row's id on another question
           _teacher_row("fresh-1", "What is 20 plus 22?", "42"),
           _teacher_row("fresh-2", "What is 30 plus 3?", "33")]
  path = tmp_path / "teacher.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_a_file_source_with_nothing_held_out_is_one_error_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    eval_cli.main(["--model", "tiny-llama", "--out", str(tmp_path), "data.source=gsm8k",
                   f"data.path={FIXTURES / 'gsm8k.jsonl'}", "data.eval_size=0"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: no rows to evaluate") and "--data" in err and "\n" not in err


@pytest.mark.slow
def test_eval_on_a_file_source_never_sees_a_training_row(tmp_path, leaky_file, capsys):
  overrides = ["data.source=teacher", f"data.path={leaky_file}", "data.eval_size=4", "data.size=100"]
  cfg = config_io.load(Config, None, overrides)
  train = split_records(cfg.data).train
  rows = eval_cli.eval_records(cfg.data)
  assert [r.id for r in rows] == ["fresh-1", "fresh-2"]
  assert not {r.id for r in rows} & {r.id for r in train}
  assert not {question_tokens(r.prompt) for r in rows} & {question_tokens(r.prompt) for r in train}
  assert "in_train': 2" in capsys.readouterr().out
  # the CLI without --data scores that held-out split, not the training file
  out = tmp_path / "out"
  eval_cli.main(["--model", "tiny-llama", "--out", str(out), *TINY_ARGS, *overrides])
  assert [s["id"] for s in _samples(out / "samples.jsonl")] == ["fresh-1", "fresh-2"]


def test_reward_means_cover_the_rows_a_reward_applies_to():
  from tpu_reason import scoring
  got = scoring._reward_means({"format": np.array([1.0, 0.0]), "process": np.array([np.nan, 0.5])})
  assert got == {"format_accuracy": 0.5, "reward/format": 0.5, "reward/process": 0.5}
  none = scoring._reward_means({"format": np.array([1.0, 1.0]), "process": np.array([np.nan, np.nan])})
  assert "reward/process" not in none  # no row has checkpoints: no figure, not a NaN
