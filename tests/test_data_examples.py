"""Tests for tpu_reason.data (render, examples, report, loader, batch) and prepare: fixed shapes, no
truncation, resumable order."""

import dataclasses
import os
import pathlib

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported

import numpy as np
import pytest

from tpu_reason import models, tags
from tpu_reason.config import DataCfg
from tpu_reason.data import examples as data_examples, loader, render, sources
from tpu_reason.data.examples import build_examples
from tpu_reason.data.loader import batch_order, batches
from tpu_reason.data.prepare import prepare

# The project-wide fixed shapes (the CPU default recipe trims them; these tests use the spec's).
SHAPES = dict(max_prompt_tokens=256, max_completion_tokens=512, system_prompt="")
from tpu_reason.data.sources import Record
from tpu_reason.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SAMPLE = ROOT / "data" / "gsm_symbolic_sample.jsonl"
BUCKETS = (128, 256, 512)
P = 256


@pytest.fixture(scope="module")
def model():
  return models.load("smollm2-135m")


@pytest.fixture(scope="module")
def gym_records():
  records, _ = sources.load_source(kind="reasoning_gym", name="gsm_symbolic", seed=0, size=24)
  return records


def _record(i: int, reasoning: str = "2 + 2 = 4.", prompt: str = "What is 2 + 2?") -> Record:
  return Record(f"r{i}", prompt, reasoning, "4", ("2 + 2 = 4",), "math")


def _build(records, model, schema="reasoning", **kw):
  kw = {"max_prompt_tokens": P, "max_completion_tokens": 512, "buckets": BUCKETS, **kw}
  return build_examples(records, model, tags.get_schema(schema), **kw)


def _ids(batch_iter):
  return [tuple(b.id) for b in batch_iter]


# ---------------------------------------------------------------- shapes


def test_batches_have_static_shapes_and_dtypes(model, gym_records):
  examples, report = _build(gym_records, model)
  assert report.kept == len(examples) == 24 and report.accounted
  seen_buckets = set()
  for batch in batches(examples, 4, seed=0, num_epochs=1):
    c = batch.arrays.completion_tokens_BxC.shape[1]
    seen_buckets.add(c)
    assert c in BUCKETS
    assert batch.arrays.prompt_tokens_BxP.shape == batch.arrays.prompt_mask_BxP.shape == (4, P)
    assert batch.arrays.completion_mask_BxC.shape == (4, c)
    assert batch.arrays.prompt_tokens_BxP.dtype == batch.arrays.completion_tokens_BxC.dtype == np.int32
    assert batch.arrays.prompt_mask_BxP.dtype == batch.arrays.completion_mask_BxC.dtype == np.bool_
    assert batch.example_mask_B.tolist() == [True] * 4
    for key in ("answer", "checkpoints", "prompt_text", "id"):
      assert isinstance(getattr(batch, key), list) and len(getattr(batch, key)) == 4
  assert len(seen_buckets) >= 2  # gsm_symbolic spans the 128 and 256 buckets


def test_padding_positions_and_eos(model, gym_records):
  examples, _ = _build(gym_records, model)
  pad, eos = model.pad_id, model.end_of_turn_id
  assert eos == model.tokenizer.convert_tokens_to_ids("<|im_end|>")
  for ex in examples:
    n_p, n_c = ex.prompt_len, ex.completion_len
    assert ex.prompt_mask_P.tolist() == [False] * (P - n_p) + [True] * n_p  # left padded
    assert ex.completion_mask_C.tolist() == [True] * n_c + [False] * (ex.bucket - n_c)  # right padded
    assert (ex.prompt_tokens_P[~ex.prompt_mask_P] == pad).all()
    assert (ex.completion_tokens_C[~ex.completion_mask_C] == pad).all()
    assert ex.prompt_tokens_P[ex.prompt_mask_P].tolist() == model.encode(ex.prompt_text)
    assert ex.prompt_text.endswith("<|im_start|>assistant\n<reasoning>\n")
    completion = ex.completion_tokens_C[ex.completion_mask_C]
    assert completion[-1] == eos  # the loss covers the stop token
    assert model.tokenizer.decode(completion[:-1].tolist()) == ex.completion_text  # nothing truncated
  batch = next(batches(examples, 4, seed=0))
  last = batch.arrays.completion_mask_BxC.sum(axis=1) - 1
  assert (batch.arrays.completion_tokens_BxC[np.arange(4), last] == eos).all()


def test_end_of_turn_comes_from_the_chat_template(model):
  # Gemma lists <eos> before <end_of_turn>; the template decides which ends a turn.
  im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
  eos_first = dataclasses.replace(model, eos_ids=(model.tokenizer.convert_tokens_to_ids("<|endoftext|>"), im_end))
  assert eos_first.end_of_turn_id == im_end
  examples, _ = _build([_record(0)], eos_first)
  assert examples[0].completion_tokens_C[examples[0].completion_len - 1] == im_end


def test_overlong_rows_are_dropped_and_counted(model):
  ok = _record(0)
  long_prompt = _record(1, prompt="Add these numbers: " + " + ".join(["7"] * 300) + ".")
  long_completion = _record(2, reasoning=" ".join(f"{i} + 1 = {i + 1}." for i in range(300)))
  examples, report = _build([ok, long_prompt, long_completion], model)
  assert [ex.id for ex in examples] == ["r0"]
  assert report.dropped == {"prompt_too_long": 1, "completion_too_long": 1}
  assert (report.seen, report.kept) == (3, 1) and report.accounted
  assert len(report.prompt_lengths) == 3 and max(report.prompt_lengths) > P  # histograms see them
  assert "over_limit=1" in str(report)


def test_prompt_only_examples_need_no_trace_and_drop_long_prompts(model):
  no_trace = Record("a", "What is 2 + 2?", "", "4", (), "math")
  long_trace = _record(1, reasoning=" ".join(f"{i} + 1 = {i + 1}." for i in range(300)))
  long_prompt = _record(2, prompt="Add these numbers: " + " + ".join(["7"] * 300) + ".")
  schema = tags.get_schema("reasoning")
  examples, report = data_examples.build_prompts([no_trace, long_trace, long_prompt], model, schema,
                                                 max_prompt_tokens=P)
  assert [e.id for e in examples] == ["a", "r1"]  # a trace of any length does not matter for RL prompts
  assert report.dropped == {"prompt_too_long": 1} and report.accounted and "buckets" not in report.summary()
  full, _ = _build([_record(1)], model)
  ex = examples[1]
  np.testing.assert_array_equal(ex.prompt_tokens_P, full[0].prompt_tokens_P)  # same rendering as SFT
  assert ex.prompt_text.endswith(schema.primer) and ex.bucket == 0 and ex.answer == "4"
  assert ex.checkpoints == ("2 + 2 = 4",)
  batch = next(batches(examples, 2, seed=0))
  assert batch.arrays.prompt_tokens_BxP.shape == (2, P) and batch.arrays.completion_tokens_BxC.shape == (2, 0)


def test_row_lands_in_smallest_fitting_bucket(model):
  # Reasoning lengths chosen to span the three buckets.
  records = [_record(k, reasoning=" ".join(f"{i} + 1 = {i + 1}." for i in range(k))) for k in (2, 8, 12, 20, 30)]
  examples, report = _build(records, model)
  assert report.kept == 5
  for ex in examples:
    assert ex.bucket == min(b for b in BUCKETS if b >= ex.completion_len)
  assert set(report.per_bucket) == set(BUCKETS)
  # One bucket only (the default) pads everything to max_completion_tokens.
  single, _ = _build(records, model, buckets=())
  assert {ex.bucket for ex in single} == {512}


def test_unparseable_target_is_dropped(model):
  bad = _record(0, reasoning="I think </reasoning> is a tag.")
  examples, report = _build([bad, _record(1)], model)
  assert [ex.id for ex in examples] == ["r1"]
  assert report.dropped == {"target_unparseable": 1} and report.accounted


def test_system_prompt_is_rendered(model):
  prompt, completion = render.render(_record(0), model, tags.get_schema("reasoning"), "Be brief.")
  assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt
  assert completion.endswith("</answer>") and not completion.startswith("<reasoning>")


# ---------------------------------------------------------------- order


def test_batch_order_is_deterministic_and_covers_each_example_once():
  sizes = {128: 12, 256: 8}
  order = batch_order(sizes, 4, seed=3, epoch=0)
  assert [(b, i.tolist()) for b, i in order] == [(b, i.tolist()) for b, i in batch_order(sizes, 4, seed=3, epoch=0)]
  for bucket, n in sizes.items():
    got = sorted(int(i) for b, idx in order if b == bucket for i in idx)
    assert got == list(range(n))
  assert all(len(idx) == 4 for _, idx in order)


def test_batch_order_differs_across_epochs_and_seeds():
  sizes = {128: 16, 256: 16}

  def flat(seed, epoch):
    return [(b, tuple(i.tolist())) for b, i in batch_order(sizes, 4, seed=seed, epoch=epoch)]

  assert flat(0, 0) != flat(0, 1)
  assert flat(0, 0) != flat(1, 0)


def test_drop_remainder_keeps_only_full_batches():
  order = batch_order({128: 10, 512: 3}, 4, seed=0, epoch=0)
  assert [len(i) for _, i in order] == [4, 4]
  assert loader.steps_per_epoch({128: 10, 512: 3}, 4) == 2
  padded = batch_order({128: 10, 512: 3}, 4, seed=0, epoch=0, shuffle=False, drop_remainder=False)
  assert [(b, i.tolist()) for b, i in padded] == [(128, [0, 1, 2, 3]), (128, [4, 5, 6, 7]), (128, [8, 9]), (512, [0, 1, 2])]


def test_resume_from_any_step_gives_the_same_batches(model, gym_records):
  examples, _ = _build(gym_records, model)
  full = _ids(batches(examples, 4, seed=7, num_epochs=3))
  per_epoch = loader.steps_per_epoch({b: len(g) for b, g in loader.group_by_bucket(examples).items()}, 4)
  assert len(full) == 3 * per_epoch
  assert full[:per_epoch] != full[per_epoch : 2 * per_epoch]  # reshuffled each epoch
  for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2, 3 * per_epoch - 1):
    assert _ids(batches(examples, 4, seed=7, start_step=k, num_epochs=3)) == full[k:]
  # The endless iterator agrees with the bounded one.
  endless = batches(examples, 4, seed=7, start_step=2)
  assert [tuple(next(endless).id) for _ in range(len(full) - 2)] == full[2:]


def test_eval_batches_cover_everything_with_masked_filler(model, gym_records):
  examples, _ = _build(gym_records[:10], model, buckets=())
  got = list(batches(examples, 4, shuffle=False, drop_remainder=False, num_epochs=1))
  assert [b.example_mask_B.tolist() for b in got] == [[True] * 4, [True] * 4, [True, True, False, False]]
  assert [i for b in got for i, m in zip(b.id, b.example_mask_B) if m] == [ex.id for ex in examples]
  assert not got[-1].arrays.completion_mask_BxC[2:].any()  # filler rows carry no loss
  assert got[-1].arrays.prompt_tokens_BxP.shape == (4, P)


def test_no_full_batch_is_a_user_error(model):
  examples, _ = _build([_record(0)], model)
  with pytest.raises(ValueError, match="no full batch"):
    next(batches(examples, 4))


# ---------------------------------------------------------------- sources x schemas

SOURCE_FILES = {
  "teacher": FIXTURES / "teacher.jsonl",
  "gsm8k": FIXTURES / "gsm8k.jsonl",
  "s1k": FIXTURES / "s1k.jsonl",
  "s1k_tokenized": FIXTURES / "s1k_tokenized.jsonl",
  "dolphin_r1": FIXTURES / "dolphin_r1.jsonl",
  "sample": SAMPLE,
}


def _source_records(name, gym_records):
  if name == "reasoning_gym":
    return gym_records
  kind = {"s1k_tokenized": "s1k", "sample": "teacher"}.get(name, name)
  records, report = sources.load_source(kind=kind, path=SOURCE_FILES[name], strict=False)
  assert records, report
  return records


@pytest.mark.parametrize("schema_name", ["reasoning", "think", "s1"])
@pytest.mark.parametrize("source", [*SOURCE_FILES, "reasoning_gym"])
def test_every_source_renders_and_parses_back(model, gym_records, source, schema_name):
  schema = tags.get_schema(schema_name)
  records = _source_records(source, gym_records)
  for record in records:
    prompt, completion = render.render(record, model, schema)
    assert prompt.endswith(schema.primer) and record.prompt in prompt
    parsed = schema.parse(schema.primer + completion)
    assert parsed.well_formed and parsed.answer == record.answer
  _, report = _build(records, model, schema_name, max_prompt_tokens=4096, max_completion_tokens=32768, buckets=())
  assert report.kept == len(records) and report.accounted


# ---------------------------------------------------------------- prepare


def test_prepare_reasoning_gym(model):
  cfg = DataCfg(**SHAPES, size=16, eval_size=4, completion_buckets=BUCKETS)
  train, evals, reports = prepare(cfg, model)
  assert (len(train), len(evals)) == (16, 4)
  assert not {ex.id for ex in train} & {ex.id for ex in evals}
  for r in reports.values():
    assert r.accounted
  assert sum(reports["train"].per_bucket.values()) == 16


def test_prepare_drops_eval_rows_seen_in_train_and_draws_on_past_them(model):
  cfg = DataCfg(**SHAPES, size=8, eval_size=4, eval_seed=0)  # same seed: the eval stream starts with train's rows
  train, evals, reports = prepare(cfg, model)
  # the stream is read on (4, 8, then 16 rows) until 4 fresh rows turn up: rows 8-11, after the 8 in train
  assert len(evals) == 4 and not {ex.id for ex in train} & {ex.id for ex in evals}
  assert reports["eval"].dropped == {"in_train": 8} and reports["eval"].accounted
  more, _, _ = prepare(dataclasses.replace(cfg, size=16), model)
  assert [ex.id for ex in more[8:12]] == [ex.id for ex in evals]


def test_prepare_file_source_holds_out_the_tail(model):
  cfg = DataCfg(**SHAPES, source="teacher", path=str(SAMPLE), size=40, eval_size=8)
  train, evals, reports = prepare(cfg, model)
  records, _ = sources.load_teacher(SAMPLE)
  assert [ex.id for ex in evals] == [r.id for r in records[-8:]]
  assert len(train) == 40 and not {ex.id for ex in train} & {ex.id for ex in evals}
  t = reports["train"]
  assert t.seen == 64 and t.dropped == {"held_out_eval": 8, "over_size": 16} and t.accounted
  again, _, _ = prepare(cfg, model)
  assert [ex.id for ex in again] == [ex.id for ex in train]  # seeded sample
  other, _, _ = prepare(dataclasses.replace(cfg, seed=1), model)
  assert [ex.id for ex in other] != [ex.id for ex in train]


def test_prepare_merges_source_drops(model):
  bad = FIXTURES / "teacher_bad.jsonl"
  cfg = DataCfg(**SHAPES, source="teacher", path=str(bad), eval_size=0, strict=False)
  records, loaded = sources.load_teacher(bad, strict=False)
  assert records and loaded.dropped  # one good row, several bad ones
  _, _, reports = prepare(cfg, model)
  t = reports["train"]
  assert t.seen == loaded.seen and t.accounted
  for reason, n in loaded.dropped.items():
    assert t.dropped[reason] == n


def test_reasoning_gym_task_options(model):
  from tpu_reason.data.prepare import parse_task, prepare_prompts

  assert parse_task("chain_sum:min_digits=1, max_terms=2") == ("chain_sum", {"min_digits": 1, "max_terms": 2})
  assert parse_task("gsm_symbolic") == ("gsm_symbolic", {})
  with pytest.raises(UserError, match="key=value"):
    parse_task("chain_sum:min_digits")
  data = DataCfg(task="chain_sum:min_digits=1,max_digits=1,min_terms=2,max_terms=2", size=8, eval_size=4)
  train, evals, _ = prepare_prompts(data, model)
  import re

  for e in train + evals:
    problem = e.prompt_text.split("problem:")[1].split("=")[0]
    assert len(re.findall(r"\d+", problem)) == 2 and all(len(n) == 1 for n in re.findall(r"\d+", problem)), problem
