"""Tests for tpu_reason.lora: init at the base model, merge, counts, target selection, grads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import TINY_JIT, TINY_LLAMA, tiny_params
from tpu_reason import lora
from tpu_reason.config import LoraCfg
from tpu_reason.errors import UserError
from tpu_reason.models.transformer import forward, logits
from tpu_reason.tree import flatten, unflatten

ALL = ("q", "k", "v", "o", "gate", "up", "down")

fwd = jax.jit(forward, static_argnames=("cfg",))  # real weights
tiny_fwd = jax.jit(forward, static_argnames=("cfg",), compiler_options=TINY_JIT)


def key(seed=0):
  # rbg: compiling jax's default threefry PRNG for the smollm2 adapter shapes takes
  # 2-4 s per shape on CPU; lora.init draws with whatever PRNG the key carries.
  return jax.random.key(seed, impl="rbg")


def randomize_b(adapters, seed=1, std=0.01):
  """Adapters with B drawn at random (a fresh init has B = 0)."""
  rng = np.random.default_rng(seed)
  flat = {n: (jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) if n.endswith("/b") else x)
          for n, x in flatten(adapters).items()}
  return unflatten(flat)


def last_logits(params, cfg, tokens, lora_tree=None, scale=1.0, n=4, jit=tiny_fwd):
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden = jit(params, cfg, tokens, pos, lora=lora_tree, lora_scale=scale)
  return np.asarray(logits(params, cfg, hidden[:, -n:]))


@pytest.fixture(scope="module")
def smol(smollm2):
  """The real SmolLM2 with a fresh r=16 adapter on all 7 projections, plus a prompt."""
  lcfg = LoraCfg(rank=16, alpha=32.0)
  adapters = lora.init(smollm2.cfg, lcfg, key())
  tokens = jnp.asarray(smollm2.encode("Janet has 3 apples and buys 5 more. How many apples does she have?"))[None]
  base = last_logits(smollm2.params, smollm2.cfg, tokens, jit=fwd)
  return smollm2, lcfg, adapters, tokens, base


# --------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_fresh_adapter_is_the_base_model(smol):
  m, lcfg, adapters, tokens, base = smol
  assert all(np.all(np.asarray(x) == 0) for n, x in flatten(adapters).items() if n.endswith("/b"))
  with_lora = last_logits(m.params, m.cfg, tokens, adapters, lora.scale(lcfg), jit=fwd)
  np.testing.assert_allclose(with_lora, base, atol=1e-6, rtol=0)  # B = 0 adds exact zeros


def test_fresh_adapter_a_is_scaled_by_fan_in(smol):
  m, _, adapters, _, _ = smol
  fan_in = {"q": 576, "k": 576, "v": 576, "gate": 576, "up": 576, "o": 9 * 64, "down": 1536}
  for name, n in fan_in.items():
    a = np.asarray(adapters["layers"][name]["a"])
    assert abs(a.std() * np.sqrt(n) - 1) < 0.05, name
  # every layer gets its own draw
  a = np.asarray(adapters["layers"]["q"]["a"])
  assert not np.allclose(a[0], a[1])


@pytest.mark.slow
def test_nonzero_b_changes_logits_and_merge_matches(smol):
  m, lcfg, adapters, tokens, base = smol
  trained = randomize_b(adapters)
  scale = lora.scale(lcfg)
  assert scale == 2.0  # alpha / rank
  with_lora = last_logits(m.params, m.cfg, tokens, trained, scale, jit=fwd)
  assert np.abs(with_lora - base).max() > 0.1
  merged = lora.merge(m.params, trained, scale)
  assert jax.tree.structure(merged) == jax.tree.structure(m.params)
  assert all(a.shape == b.shape and a.dtype == b.dtype
             for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m.params)))
  # logits reach ~35 here; f32 re-association of W + s*A@B vs x@W + s*(x@A)@B over
  # 30 layers gives ~1e-4 absolute differences
  np.testing.assert_allclose(last_logits(merged, m.cfg, tokens, jit=fwd), with_lora, atol=5e-4, rtol=0)
  # lora_scale really scales the update: scale 0 is the base model again
  np.testing.assert_allclose(last_logits(m.params, m.cfg, tokens, trained, 0.0, jit=fwd), base, atol=1e-6, rtol=0)


def test_describe_counts_adapter_parameters_by_hand(smol):
  m, lcfg, adapters, _, _ = smol
  r, d, f, nh, kh, hd, layers = 16, 576, 1536, 9, 3, 64, 30
  # r * (fan_in + fan_out) per projection and layer
  per_layer = r * ((d + nh * hd) + 2 * (d + kh * hd) + (nh * hd + d) + 2 * (d + f) + (f + d))
  n = layers * per_layer
  assert lora.count(adapters) == n == 4_884_480
  base = 134_515_008  # SmolLM2-135M: 30 layers x 3,540,096 + 49152 x 576 tied embedding + 576
  assert lora.count(m.params) == m.cfg.num_params == base
  assert lora.describe(m.params, adapters) == f"trainable {n:,} of {n + base:,} ({100 * n / (n + base):.2f}%)"
  assert lora.describe(m.params, adapters) == "trainable 4,884,480 of 139,399,488 (3.50%)"


# --------------------------------------------------------------------------- targets


def test_targets_regex_selects_projections():
  cfg = TINY_LLAMA
  adapters = lora.init(cfg, LoraCfg(rank=4, targets="q|v"), key())
  assert sorted(adapters["layers"]) == ["q", "v"]
  assert sorted(lora.shapes(cfg, LoraCfg(rank=4, targets="q|v"))) == [
      "layers/q/a", "layers/q/b", "layers/v/a", "layers/v/b"]
  # full match: "o" is not "down", "up" is not "gate|up" partially
  assert lora.targets(LoraCfg(targets="o")) == ["o"]
  assert lora.targets(LoraCfg(targets="gate|up")) == ["gate", "up"]
  assert lora.targets(LoraCfg(targets=".*")) == list(ALL)
  assert lora.targets(LoraCfg()) == list(ALL)


@pytest.mark.parametrize("bad", ["nope", "qq", "Q"])
def test_targets_matching_nothing_is_a_user_error(bad):
  with pytest.raises(UserError, match="matches no projection"):
    lora.init(TINY_LLAMA, LoraCfg(targets=bad), key())


def test_adapter_shapes_follow_rank_and_projection():
  cfg, r = TINY_LLAMA, 3
  s = {k: v[0] for k, v in lora.shapes(cfg, LoraCfg(rank=r)).items()}
  L, D, F, N, K, H = 2, 32, 64, 4, 2, 8
  assert s["layers/q/a"] == (L, D, r) and s["layers/q/b"] == (L, r, N, H)
  assert s["layers/k/b"] == (L, r, K, H) and s["layers/o/a"] == (L, N, H, r)
  assert s["layers/o/b"] == (L, r, D) and s["layers/down/a"] == (L, F, r) and s["layers/gate/b"] == (L, r, F)


def test_only_selected_projections_change_output():
  """An adapter on v alone leaves the q/k projections (and so attention weights) alone,
  but changes outputs; on an unused target set the output is unchanged."""
  cfg, params = TINY_LLAMA, tiny_params(TINY_LLAMA)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
  base = last_logits(params, cfg, tokens)
  v_only = randomize_b(lora.init(cfg, LoraCfg(rank=4, targets="v"), key()), std=0.5)
  changed = last_logits(params, cfg, tokens, v_only, 2.0)
  assert np.abs(changed - base).max() > 1e-3
  merged = lora.merge(params, v_only, 2.0)
  for name in ("q", "k", "o", "gate", "up", "down"):
    np.testing.assert_array_equal(merged["layers"][name], params["layers"][name])
  assert not np.allclose(merged["layers"]["v"], params["layers"]["v"])


# --------------------------------------------------------------------------- tiny models


def test_merge_equals_adapter_forward_tiny(tiny):
  cfg, params = tiny
  lcfg = LoraCfg(rank=4, alpha=8.0)
  adapters = randomize_b(lora.init(cfg, lcfg, key(3)), std=0.3)
  before = jax.tree.map(np.array, params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  with_lora = last_logits(params, cfg, tokens, adapters, lora.scale(lcfg), n=9)
  assert np.abs(with_lora - last_logits(params, cfg, tokens, n=9)).max() > 1e-2
  merged = lora.merge(params, adapters, lora.scale(lcfg))
  np.testing.assert_allclose(last_logits(merged, cfg, tokens, n=9), with_lora, atol=1e-5, rtol=0)
  # merge is functional: the base params are not modified in place
  jax.tree.map(np.testing.assert_array_equal, params, before)


@pytest.mark.slow
def test_merge_with_qkv_bias():
  cfg = dataclasses.replace(TINY_LLAMA, family="qwen2", qkv_bias=True)
  params = tiny_params(cfg)
  adapters = randomize_b(lora.init(cfg, LoraCfg(rank=2), key(4)), std=0.3)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 5)), jnp.int32)
  merged = lora.merge(params, adapters, 0.5)
  np.testing.assert_allclose(
      last_logits(merged, cfg, tokens, n=5), last_logits(params, cfg, tokens, adapters, 0.5, n=5), atol=1e-5)


def _loss(adapters, params, cfg, tokens, targets, scale, remat="none"):
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden = forward(params, cfg, tokens, pos, lora=adapters, lora_scale=scale, remat=remat)
  lp = jax.nn.log_softmax(logits(params, cfg, hidden), axis=-1)
  return -jnp.take_along_axis(lp, targets[..., None], axis=-1).mean()


# gradient w.r.t. the first argument (the adapters) only; one compile shared by the tests
loss_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(2, 6), compiler_options=TINY_JIT)


def _batch(cfg, seed):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32) for _ in range(2))


@pytest.mark.slow
def test_gradients_flow_to_adapters_only(tiny):
  cfg, params = tiny
  adapters = lora.init(cfg, LoraCfg(rank=4, alpha=8.0), key(5))
  tokens, targets = _batch(cfg, 3)
  before = jax.tree.map(np.array, params)
  loss0, grads = loss_and_grad(adapters, params, cfg, tokens, targets, 2.0)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  for name, g in flatten(grads).items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    if name.endswith("/a"):  # d/dA of x A B s with B = 0 is exactly 0 at init
      assert np.all(g == 0), name
    else:  # ... while B gets a signal in every layer
      assert np.all(np.abs(g).reshape(cfg.num_layers, -1).max(-1) > 0), name

  # one SGD step on the adapters lowers the loss; the base weights stay bit-identical
  step = jax.tree.map(lambda p, g: p - 1.0 * g, adapters, grads)
  loss1, grads1 = loss_and_grad(step, params, cfg, tokens, targets, 2.0)
  assert loss1 < loss0
  jax.tree.map(np.testing.assert_array_equal, params, before)
  # once B is nonzero, A gets gradients too
  assert all(np.abs(np.asarray(g)).max() > 0 for n, g in flatten(grads1).items() if n.endswith("/a"))


def test_adapter_gradient_matches_finite_difference():
  cfg, params = TINY_LLAMA, tiny_params(TINY_LLAMA)
  adapters = randomize_b(lora.init(cfg, LoraCfg(rank=4, alpha=8.0), key(6)), std=0.1)
  tokens, targets = _batch(cfg, 4)
  _, grads = loss_and_grad(adapters, params, cfg, tokens, targets, 2.0)
  rng = np.random.default_rng(5)
  direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapters)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  eps = 1e-2
  loss_at = lambda s: float(loss_and_grad(  # noqa: E731
      jax.tree.map(lambda x, d: x + s * eps * d, adapters, direction), params, cfg, tokens, targets, 2.0)[0])
  numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
  assert abs(analytic) > 1e-3
  assert abs(numeric - analytic) < 2e-2 * abs(analytic) + 1e-4, (numeric, analytic)


def test_low_rank_backward_equals_autodiff_of_the_plain_product():
  rng = np.random.default_rng(7)
  x, a, b, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((6, 5), (5, 3), (3, 4), (6, 4)))
  from tpu_reason.models.transformer import low_rank

  mine = jax.vjp(low_rank, x, a, b)
  plain = jax.vjp(lambda x, a, b: (x @ a) @ b, x, a, b)
  np.testing.assert_allclose(mine[0], plain[0], rtol=1e-6)
  for got, want in zip(mine[1](dy), plain[1](dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_policies_give_the_gradient_of_no_remat(remat):
  cfg, params = TINY_LLAMA, tiny_params(TINY_LLAMA)
  adapters = randomize_b(lora.init(cfg, LoraCfg(rank=4, alpha=8.0), key(8)), std=0.1)
  tokens, targets = _batch(cfg, 2)
  want = loss_and_grad(adapters, params, cfg, tokens, targets, 2.0)
  got = loss_and_grad(adapters, params, cfg, tokens, targets, 2.0, remat=remat)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7), got[1], want[1])


def test_config_remat_choices_are_the_transformers_policies():
  from tpu_reason.choices import REMAT
  from tpu_reason.models.transformer import REMAT as POLICIES

  assert tuple(POLICIES) == REMAT
