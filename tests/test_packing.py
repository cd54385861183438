"""Sequence packing (`data.pack`): several examples per fixed-width row, each attending only to itself.

The rows are checked token by token against the examples they hold, and the packed log-probs
against the same examples run one per row in the prompt + completion layout (both tiny models:
the Gemma-3 one has a sliding window, so positions must restart in each segment).
"""

import jax
import numpy as np
import pytest

from tests.conftest import TINY_JIT
from tpu_reason import losses, padding, sft
from tpu_reason.data import batch as data_batch, examples as data_examples, loader, packing
from tpu_reason.errors import UserError

PAD, P, C = 0, 12, 16


def example(i: int, prompt_len: int, completion_len: int) -> data_examples.Example:
  """Token ids 1.. (never the pad id), distinct per example so a misplaced segment shows."""
  rng = np.random.default_rng(i)
  p_ids, c_ids = rng.integers(1, 128, prompt_len).tolist(), rng.integers(1, 128, completion_len).tolist()
  p_tokens, p_mask = padding.left_pad(p_ids, P, PAD)
  c_tokens, c_mask = padding.right_pad(c_ids, C, PAD)
  return data_examples.Example(f"e{i}", "", "", "", (), "", p_tokens, p_mask, c_tokens, c_mask)


EXAMPLES = [example(i, p, c) for i, (p, c) in enumerate([(5, 7), (12, 16), (3, 2), (8, 4), (6, 11), (2, 9)])]


def test_every_example_lands_once_whole_and_in_order_of_its_tokens():
  rows = packing.pack(EXAMPLES, P + C, C, PAD, seed=0)
  by_id = {ex.id: ex for ex in EXAMPLES}
  assert sorted(i for r in rows for i in r.ids) == sorted(by_id)
  assert len(rows) < len(EXAMPLES)  # something was packed together
  for r in rows:
    assert r.bucket == P + C
    for seg, ex_id in enumerate(r.ids, start=1):
      ex = by_id[ex_id]
      at = r.segments_L == seg
      want = np.concatenate([ex.prompt_tokens_P[ex.prompt_mask_P], ex.completion_tokens_C[ex.completion_mask_C]])
      np.testing.assert_array_equal(r.tokens_L[at], want)
      np.testing.assert_array_equal(r.positions_L[at], np.arange(len(want)))
      # the hidden state before each completion token is where the loss reads it
      targets = r.target_at_C[r.completion_mask_C]
      np.testing.assert_array_equal(r.tokens_L[targets[r.segments_L[targets] == seg] + 1],
                                    ex.completion_tokens_C[ex.completion_mask_C])
    assert (r.tokens_L[r.segments_L == 0] == PAD).all()
    assert r.completion_mask_C.sum() == sum(by_id[i].completion_len for i in r.ids)
    # segments are contiguous and numbered in order: padding only at the end
    used = r.segments_L[r.segments_L > 0]
    assert (np.diff(used) >= 0).all() and (r.segments_L[len(used):] == 0).all()


def test_packing_is_a_pure_function_of_the_seed():
  ids = lambda rows: [r.ids for r in rows]  # noqa: E731
  assert ids(packing.pack(EXAMPLES, P + C, C, PAD, seed=0)) == ids(packing.pack(EXAMPLES, P + C, C, PAD, seed=0))
  assert any(ids(packing.pack(EXAMPLES, P + C, C, PAD, seed=s)) != ids(packing.pack(EXAMPLES, P + C, C, PAD, seed=0))
             for s in range(1, 6))


def test_an_example_wider_than_the_row_is_a_user_error():
  with pytest.raises(UserError, match=r"e1 has 28 tokens \(16 in its completion\)"):
    packing.pack(EXAMPLES, 20, C, PAD)
  with pytest.raises(UserError, match=r"e1 has 28 tokens \(16 in its completion\)"):
    packing.pack(EXAMPLES, P + C, 15, PAD)


def test_a_row_holds_at_most_its_target_count_of_completion_tokens():
  for targets in (C, 20, 30):
    rows = packing.pack(EXAMPLES, 3 * (P + C), targets, PAD)
    assert all(r.completion_mask_C.shape == (targets,) for r in rows)
    by_id = {ex.id: ex for ex in EXAMPLES}
    assert all(sum(by_id[i].completion_len for i in r.ids) == r.completion_mask_C.sum() <= targets for r in rows)


def test_packed_batches_resume_exactly_and_fill_short_batches_without_loss():
  rows = packing.pack(EXAMPLES, P + C, C, PAD, seed=0)
  straight = loader.batches(rows, 2, seed=3)
  first = [next(straight) for _ in range(5)]
  resumed = next(loader.batches(rows, 2, seed=3, start_step=4))
  for k in ("tokens_BxL", "segments_BxL", "positions_BxL", "target_at_BxC", "completion_mask_BxC"):
    np.testing.assert_array_equal(getattr(resumed.arrays, k), getattr(first[4].arrays, k))
  short = data_batch.collate_packed(rows[:1], 3)
  assert short.example_mask_B.tolist() == [True, False, False]
  mask = short.arrays.completion_mask_BxC
  assert mask[1:].sum() == 0 and mask[0].sum() == rows[0].completion_mask_C.sum()
  assert data_batch.real_tokens(short.arrays) == 3 * int((rows[0].segments_L > 0).sum())


def test_packed_logprobs_equal_each_example_run_alone(tiny):
  cfg, params = tiny
  rows = packing.pack(EXAMPLES, 2 * (P + C), 2 * C, PAD, seed=0)  # wide rows: 2-3 examples each
  assert max(len(r.ids) for r in rows) >= 3
  logprobs = jax.jit(lambda b: losses.sft_logprobs(params, cfg, b, chunk=48), compiler_options=TINY_JIT)
  packed = data_batch.collate_packed(rows, len(rows))
  alone = data_batch.collate(EXAMPLES, len(EXAMPLES))
  logp, logp1 = np.asarray(logprobs(sft.device_batch(packed))), np.asarray(logprobs(sft.device_batch(alone)))
  mask, mask1 = packed.arrays.completion_mask_BxC, alone.arrays.completion_mask_BxC
  row_of = {ex_id: n for n, ex_id in enumerate(ex.id for ex in EXAMPLES)}
  for b, r in enumerate(rows):
    got = logp[b][mask[b]]  # the row's completion tokens, example after example
    want = np.concatenate([logp1[row_of[i]][mask1[row_of[i]]] for i in r.ids])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the loss counts the same tokens: the token-mean NLL is the unpacked one
  assert mask.sum() == mask1.sum()
  np.testing.assert_allclose(losses.sft_loss(logp, mask), losses.sft_loss(logp1, mask1), rtol=1e-5)


@pytest.mark.slow
def test_a_packed_sft_run_trains_on_real_tokens_only(tmp_path, capsys):
  """`data.pack=true` end to end: rows hold several examples, tok/s counts real tokens, loss falls."""
  from tests.test_sft import make_cfg, read_metrics, write_rows

  data = write_rows(tmp_path / "rows.jsonl", 16, 16, 4)
  cfg = make_cfg(tmp_path / "run", data, "data.pack=true", "data.max_completion_tokens=160",
                 "train.max_steps=4", "train.optim.lr=3e-3")  # rows of 56 + 160 tokens: two examples each
  summary = sft.run(cfg)
  assert "packed 32 examples into" in capsys.readouterr().out
  tr = sft.build(cfg)
  assert all(isinstance(r, packing.PackedRow) for r in tr.train) and len(tr.train) <= 16
  real_per_row = [int((r.segments_L > 0).sum()) for r in tr.train]
  train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
  for r in train:
    tokens = round(r["tokens_per_s"] * r["step_time_s"])
    assert min(real_per_row) * 8 <= tokens <= max(real_per_row) * 8
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
