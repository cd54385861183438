"""GRPO maths against numbers computed by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from tpu_reason import choices, losses


def test_group_advantages_by_hand():
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
  adv = losses.group_advantages(r, 4, eps=0.0 + 1e-12)
  # group 1: mean .5, std .5 -> [1, -1, -1, 1]; group 2: all equal -> 0 (no signal)
  np.testing.assert_allclose(adv, [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-6)
  none = losses.group_advantages(r, 4, scale="none")
  np.testing.assert_allclose(none, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=1e-6)
  batch = losses.group_advantages(r, 4, scale="batch", eps=0.0)
  np.testing.assert_allclose(batch, np.array([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / np.std(r), atol=1e-6)
  with pytest.raises(ValueError):
    losses.group_advantages(r, 4, scale="nope")


def test_k3_by_hand():
  p = jnp.log(jnp.array([[0.5, 0.25]]))
  ref = jnp.log(jnp.array([[0.25, 0.25]]))
  k3 = losses.kl_k3(p, ref)
  # d = ln(.25/.5) = -ln2: e^d - d - 1 = .5 + ln2 - 1; equal probs give 0
  np.testing.assert_allclose(k3, [[0.5 + np.log(2) - 1, 0.0]], atol=1e-6)
  assert (losses.kl_k3(jnp.array([[-3.0, 0.0]]), jnp.array([[0.0, -3.0]])) >= 0).all()


def test_clipping_at_both_edges():
  old = jnp.zeros((4, 1))
  logp = jnp.log(jnp.array([[1.5], [1.5], [0.5], [0.5]]))  # ratios 1.5, 1.5, .5, .5
  adv = jnp.array([1.0, -1.0, 1.0, -1.0])
  loss, low, high = losses.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
  # A>0, r=1.5: min(1.5, 1.28) = 1.28 (clipped high); A<0, r=1.5: min(-1.5, -1.28) = -1.5
  # A>0, r=.5: min(.5, .8) = .5; A<0, r=.5: min(-.5, -.8) = -.8 (clipped low)
  np.testing.assert_allclose(loss[:, 0], [-1.28, 1.5, -0.5, 0.8], atol=1e-6)
  assert high[:, 0].tolist() == [True, False, False, False]
  assert low[:, 0].tolist() == [False, False, False, True]


def test_aggregations_by_hand():
  loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, True], [True, False, False]])
  assert float(losses.aggregate(loss, mask, "grpo")) == pytest.approx((2.0 + 4.0) / 2)
  assert float(losses.aggregate(loss, mask, "dapo")) == pytest.approx(10.0 / 4)
  assert float(losses.aggregate(loss, mask, "dr_grpo", max_tokens=5)) == pytest.approx(10.0 / (2 * 5))
  with pytest.raises(ValueError):
    losses.aggregate(loss, mask, "mean")


def test_dapo_over_micro_slices_equals_the_whole_batch():
  # rows [1,2,3] and [4] hold 4 tokens; split in two micro-batches of one row, each divides
  # its token-sum by half the mini-batch's tokens, and the mean of the two is the batch token-mean
  loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, True], [True, False, False]])
  parts = [float(losses.aggregate(loss[i:i + 1], mask[i:i + 1], "dapo", num_tokens=4 / 2)) for i in range(2)]
  assert parts == [pytest.approx(6.0 / 2), pytest.approx(4.0 / 2)]
  assert sum(parts) / 2 == pytest.approx(float(losses.aggregate(loss, mask, "dapo")))


def test_std_ddof_one_matches_trl():
  # TRL: (r - mean) / (torch.std(r) + 1e-4), torch.std being the sample std (ddof=1).
  r = np.array([1.0, 0.0, 0.0, 1.0])
  sample_std = np.sqrt(((r - 0.5) ** 2).sum() / 3)  # 0.57735
  trl = (r - 0.5) / (sample_std + 1e-4)
  np.testing.assert_allclose(losses.group_advantages(r, 4, ddof=1), trl, rtol=1e-6)
  ours = losses.group_advantages(r, 4)
  np.testing.assert_allclose(ours / losses.group_advantages(r, 4, ddof=1), (0.57735 + 1e-4) / (0.5 + 1e-4), rtol=1e-4)


def test_dr_grpo_normaliser_is_the_cap_not_the_width():
  # the same two rows trimmed to width 3 or padded to the cap 8: token-sum 10 / (2 rows * 8) either way
  loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, True], [True, False, False]])
  padded_loss, padded_mask = jnp.pad(loss, ((0, 0), (0, 5))), jnp.pad(mask, ((0, 0), (0, 5)))
  trimmed = float(losses.aggregate(loss, mask, "dr_grpo", max_tokens=8))
  assert trimmed == float(losses.aggregate(padded_loss, padded_mask, "dr_grpo", max_tokens=8)) == pytest.approx(10 / 16)


def test_sequence_level_ratio_by_hand():
  # row 0: log-ratios ln2, 0 (and a masked-out 5) -> one ratio exp(ln2 / 2) = sqrt(2) for both tokens;
  # row 1: ln .9 on all three tokens -> .9 on each
  d = jnp.array([[np.log(2.0), 0.0, 5.0], [np.log(0.9)] * 3])
  mask = jnp.array([[True, True, False], [True, True, True]])
  seq = losses.log_ratio(d, jnp.zeros_like(d), mask, level="sequence")
  np.testing.assert_allclose(jnp.exp(seq), [[np.sqrt(2)] * 3, [0.9] * 3], rtol=1e-6)
  np.testing.assert_allclose(losses.log_ratio(d, jnp.zeros_like(d)), d)  # token level: unchanged
  loss, low, high = losses.clipped_surrogate(d, jnp.zeros_like(d), jnp.array([1.0, -1.0]), 0.2, 0.28,
                                             level="sequence", mask_BxT=mask)
  # A>0, ratio 1.414: min(1.414, 1.28) = 1.28 (clipped high); A<0, ratio .9: min(-.9, -.9) = -.9 (inside)
  np.testing.assert_allclose(loss, [[-1.28] * 3, [0.9] * 3], rtol=1e-6)
  assert high[0].all() and not high[1].any() and not low.any()
  # GSPO's own clip (3e-4 / 4e-4): a sequence ratio of 1.001 is already clipped
  _, _, high = losses.clipped_surrogate(jnp.full((1, 2), np.log(1.001)), jnp.zeros((1, 2)), jnp.array([1.0]),
                                        3e-4, 4e-4, level="sequence", mask_BxT=jnp.ones((1, 2), bool))
  assert high.all()
  with pytest.raises(ValueError):
    losses.log_ratio(d, d, mask, level="word")


def test_overlong_penalty_by_hand():
  # cap 10, buffer 4: free up to 6 tokens, then -1/4 per token down to -1 at the cap
  lengths = np.array([3, 6, 7, 8, 10])
  np.testing.assert_allclose(losses.overlong_penalty(lengths, 10, 4), [0, 0, -0.25, -0.5, -1.0], atol=1e-7)
  np.testing.assert_allclose(losses.overlong_penalty(lengths, 10, 4, penalty=0.5), [0, 0, -0.125, -0.25, -0.5],
                             atol=1e-7)
  np.testing.assert_allclose(losses.overlong_penalty(np.array([9, 10]), 10, 10), [-0.9, -1.0], atol=1e-7)


def test_normalize_each_by_hand():
  # group 1: a = [1,0,1,0] (mean .5, std .5) -> [1,-1,1,-1]; b = [0,0,10,10] (mean 5, std 5) -> [-1,-1,1,1].
  # Summed raw, b's scale would decide alone ([1,0,11,10]); normalised first: [0,-2,2,0].
  # group 2: constant rewards carry no signal -> 0.
  a = [1, 0, 1, 0, 1, 1, 1, 1]
  b = [0, 0, 10, 10, 0, 0, 0, 0]
  r = np.array([a, b], np.float64)
  np.testing.assert_allclose(losses.normalize_each(r, (1.0, 1.0), 4, eps=1e-12), [0, -2, 2, 0, 0, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(losses.normalize_each(r, (2.0, 1.0), 4, eps=1e-12), [1, -3, 3, -1, 0, 0, 0, 0], atol=1e-6)
  # ddof 1: both stds grow by sqrt(4/3), so every value shrinks by sqrt(3/4)
  np.testing.assert_allclose(losses.normalize_each(r, (1.0, 1.0), 4, eps=1e-12, ddof=1),
                             np.array([0, -2, 2, 0, 0, 0, 0, 0]) * np.sqrt(0.75), atol=1e-6)


def test_every_config_choice_is_implemented_and_others_are_refused():
  """config validates grpo.loss / scale_rewards / importance_level by `choices`: losses handles exactly those."""
  r, mask = jnp.arange(8.0), jnp.ones((2, 3), bool)
  for name in choices.GRPO_LOSSES:
    assert np.isfinite(float(losses.aggregate(jnp.ones((2, 3)), mask, name, max_tokens=3)))
  for name in choices.ADVANTAGE_SCALES:
    assert losses.group_advantages(r, 4, scale=name).shape == (8,)
  for name in choices.IMPORTANCE_LEVELS:
    assert losses.log_ratio(jnp.ones((2, 3)), jnp.zeros((2, 3)), mask, level=name).shape == (2, 3)
  with pytest.raises(ValueError, match=r"grpo \| dapo \| dr_grpo"):
    losses.aggregate(jnp.ones((2, 3)), mask, "mean")
