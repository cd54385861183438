"""Data columns reach the rewards with no code between the data file and the reward: a JSONL
`difficulty` field, a toy reward that names it, one GRPO step and the held-out evals on `tiny-llama`
(the setup of test_grpo.py)."""

import json

import numpy as np
import pytest

from tests.test_grpo import fresh_state, make_cfg
from tests.test_sft import write_rows
from tpu_reason import grpo, rewards, scoring
from tpu_reason.config import SamplingCfg
from tpu_reason.data import batch as data_batch, examples as data_examples, sources


def difficulty_bonus(prompts, completions, difficulty, **_):
  """The toy reward: a row's difficulty, as a float."""
  difficulty_bonus.seen.append(list(difficulty))
  return [float(d) for d in difficulty]


@pytest.fixture
def toy_reward(monkeypatch):
  difficulty_bonus.seen = []
  monkeypatch.setitem(rewards.REWARDS, "difficulty_bonus", difficulty_bonus)
  return difficulty_bonus


def write_difficulty_rows(path):
  """test_grpo's rows, each with a `difficulty` the trainer knows nothing about; {id: difficulty}."""
  write_rows(path, 24, 8, 4)
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  for i, row in enumerate(rows):
    row["difficulty"] = i % 4 + 1
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return {r["id"]: r["difficulty"] for r in rows}


# --------------------------------------------------------------------------- loading and batching


def test_table_rows_keep_their_extra_fields_as_columns(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": 1, "difficulty": 3, "tags": ["a"], "schema": "x"}) + "\n")
  (record,), _ = sources.load_table(path)
  assert record.columns == {"difficulty": 3, "tags": ["a"]}  # `schema` is a reward argument: not a column
  assert hash(record) == hash(sources.Record(record.id, "q", "", "1", (), "math"))  # a dict does not break hashing


def test_teacher_rows_round_trip_their_columns(tmp_path):
  record = sources.Record("a", "What is 2 + 2?", "2 + 2 = 4", "4", ("2 + 2 = 4",), "math", {"difficulty": 2})
  sources.records_to_teacher_jsonl([record], tmp_path / "t.jsonl")
  (back,), _ = sources.load_teacher(tmp_path / "t.jsonl")
  assert back == record


def test_reward_columns_give_every_row_every_column():
  def example(i, columns):
    empty = np.zeros(0, np.int32)
    return data_examples.Example(f"r{i}", "p", "", str(i), (f"{i} = {i}",), "math", empty, empty.astype(bool), empty,
                           empty.astype(bool), columns)

  rows = [example(0, {"difficulty": 1}), example(1, {"source": "x"})]
  assert data_batch.reward_columns(rows) == {"difficulty": [1, None], "source": [None, "x"], "answer": ["0", "1"],
                                          "checkpoints": [["0 = 0"], ["1 = 1"]]}
  assert data_batch.collate(rows, 2).columns == data_batch.reward_columns(rows)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_new_column_reaches_its_reward_in_rollouts_and_evals(tmp_path, toy_reward):
  data = tmp_path / "rows.jsonl"
  difficulty = write_difficulty_rows(data)
  cfg = make_cfg(tmp_path / "run", data, "grpo.rewards=[format,difficulty_bonus]", "grpo.reward_weights=[1,1]",
                 "grpo.steps=1")
  tr = grpo.build(cfg)
  state, batch = fresh_state(tr), next(tr.batches(0))
  g = tr.cfg.grpo.group

  state, m, _ = tr.step(state, batch, 0)
  want = [float(difficulty[i]) for i in batch.id for _ in range(g)]  # each prompt's, over its group
  assert toy_reward.seen == [want]
  assert m["rewards/difficulty_bonus/mean"] == pytest.approx(np.mean(want))

  toy_reward.seen.clear()
  held_out = tr.evaluate(state.lora)  # the trainers' held-out eval: every reward, then the weighted ones
  want = [difficulty[r.id] for r in tr.eval[: tr.cfg.train.eval_generate]]
  assert toy_reward.seen == [want, want]
  assert held_out["reward/difficulty_bonus"] == pytest.approx(np.mean(want))

  examples = tr.eval[:2]  # the eval CLI's path: k samples per prompt, each scored with its prompt's columns
  _, samples = scoring.evaluate(tr.model, tr.params, examples, tr.schema, k=2, lora=state.lora,
                                 lora_scale=tr.lora_scale, sampling=SamplingCfg(max_new_tokens=4, temperature=0.0))
  assert [s["scores"]["difficulty_bonus"] for s in samples] == [difficulty[e.id] for e in examples for _ in "kk"]
