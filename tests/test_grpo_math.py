"""GRPO maths against numbers computed by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from tpu_reason import losses


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
