"""Tests for tpu_reason.losses: chunked-vocab log-probs, the masked SFT loss, completion log-probs.

Every expected value comes from an independent computation: a hand-worked example, a
float64 numpy log-softmax of the full logits, or the unpadded model run row by row.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import TINY_JIT
from tpu_reason import losses, models
from tpu_reason.data.batch import Batch
from tpu_reason.models.transformer import forward, logits
from tpu_reason.tree import unflatten

# --------------------------------------------------------------------------- token_logprobs


def test_token_logprobs_hand_computed():
  # one hidden unit = 1, so the logits are the weights: [0, ln 2, ln 5] -> p = [1, 2, 5] / 8
  h = jnp.ones((1, 3, 1), jnp.float32)
  w = jnp.asarray([[0.0, math.log(2.0), math.log(5.0)]], jnp.float32)
  targets = jnp.asarray([[0, 1, 2]])
  want = np.log([1 / 8, 2 / 8, 5 / 8])
  for chunk in (1, 2, 3, 8):  # 2 leaves a padded last chunk; 8 > V clamps to one chunk
    got = losses.token_logprobs(h, w, targets, chunk=chunk)
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-6, err_msg=f"chunk={chunk}")


def _reference(h, w, targets, softcap=None, temperature=1.0):
  """float64 log_softmax(softcap(h @ w) / T)[target] in numpy."""
  lg = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
  if softcap is not None:
    lg = softcap * np.tanh(lg / softcap)
  lg = lg / temperature
  lg = lg - lg.max(-1, keepdims=True)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def _jax_reference(h, w, targets, softcap=None, temperature=1.0):
  lg = jnp.einsum("btd,dv->btv", h, w)
  if softcap is not None:
    lg = softcap * jnp.tanh(lg / softcap)
  logp = jax.nn.log_softmax(lg / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def random_problem():
  rng = np.random.default_rng(0)
  b, t, d, v = 2, 5, 6, 37  # V = 37 is prime: no chunk size below 37 divides it
  h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  w = jnp.asarray(2.0 * rng.standard_normal((d, v)), jnp.float32)
  targets = rng.integers(0, v, (b, t))
  targets[0, 0], targets[1, -1] = 0, v - 1  # first column, and the last (padded) chunk's last real column
  return h, w, jnp.asarray(targets), jnp.asarray(rng.standard_normal((b, t)), jnp.float32)


@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 37, 64])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (3.0, 1.0), (None, 0.7), (2.5, 1.6)],
                         ids=["plain", "softcap", "temperature", "softcap+temperature"])
def test_token_logprobs_matches_full_log_softmax(random_problem, chunk, softcap, temperature):
  h, w, targets, _ = random_problem
  got = losses.token_logprobs(h, w, targets, chunk=chunk, softcap=softcap, temperature=temperature)
  want = _reference(h, w, targets, softcap, temperature)
  assert got.shape == targets.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got) < 0)


@pytest.mark.parametrize("chunk", [8, 37])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (2.5, 1.6)], ids=["plain", "softcap+temperature"])
@pytest.mark.slow
def test_token_logprobs_gradients_match(random_problem, chunk, softcap, temperature):
  h, w, targets, weights = random_problem

  def chunked(h, w):
    return jnp.sum(weights * losses.token_logprobs(h, w, targets, chunk=chunk, softcap=softcap,
                                                   temperature=temperature))

  def full(h, w):
    return jnp.sum(weights * _jax_reference(h, w, targets, softcap, temperature))

  got_h, got_w = jax.grad(chunked, argnums=(0, 1))(h, w)
  want_h, want_w = jax.grad(full, argnums=(0, 1))(h, w)
  assert np.abs(np.asarray(want_w)).max() > 1e-3  # a non-trivial gradient
  np.testing.assert_allclose(np.asarray(got_h), np.asarray(want_h), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- masked mean / SFT loss

LOGP_2x3 = jnp.asarray([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
MASK_2x3 = jnp.asarray([[True, False, True], [False, False, True]])


def test_masked_mean_and_sft_loss_hand_computed():
  # (-1 - 3 - 6) / 3 over the three True entries; masked-out entries must not count
  assert float(losses.masked_mean(LOGP_2x3, MASK_2x3)) == pytest.approx(-10 / 3, rel=1e-6)
  assert float(losses.sft_loss(LOGP_2x3, MASK_2x3)) == pytest.approx(10 / 3, rel=1e-6)
  # a token mean, not a mean of row means ((-2 + -6) / 2 = -4 would be the row mean)
  assert float(losses.sft_loss(LOGP_2x3, MASK_2x3)) != pytest.approx(4.0)
  # the gradient of the loss is -1/3 on each counted token, 0 elsewhere
  g = jax.grad(losses.sft_loss)(LOGP_2x3, MASK_2x3)
  np.testing.assert_allclose(np.asarray(g), -np.asarray(MASK_2x3, np.float32) / 3, rtol=1e-6)


def test_all_false_mask_is_zero_not_nan():
  none = jnp.zeros((2, 3), bool)
  assert float(losses.masked_mean(LOGP_2x3, none)) == 0.0
  assert float(losses.sft_loss(LOGP_2x3, none)) == 0.0
  g = jax.grad(losses.sft_loss)(LOGP_2x3, none)
  assert np.all(np.asarray(g) == 0.0)


# --------------------------------------------------------------------------- completion_logprobs


@pytest.fixture(scope="module")
def tiny_llama():
  model = models.load("tiny-llama")
  params = jax.tree.map(jnp.asarray, model.params)
  return model.cfg, params


def _randomize_lora(cfg, seed=3):
  from tpu_reason import lora as lora_lib
  from tpu_reason.config import LoraCfg

  lcfg = LoraCfg(rank=4, alpha=8.0, targets="q|v|down")
  rng = np.random.default_rng(seed)
  flat = {name: jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32)
          for name, (shape, _) in lora_lib.shapes(cfg, lcfg).items()}
  return unflatten(flat), lora_lib.scale(lcfg)


def _batch(rows, p, c, pad):
  """Left-padded prompts [B, P], right-padded completions [B, C] from (prompt, completion) id lists."""
  b = len(rows)
  out = {"prompt_tokens_BxP": np.full((b, p), pad, np.int32), "prompt_mask_BxP": np.zeros((b, p), bool),
         "completion_tokens_BxC": np.full((b, c), pad, np.int32), "completion_mask_BxC": np.zeros((b, c), bool)}
  for i, (prompt, completion) in enumerate(rows):
    out["prompt_tokens_BxP"][i, p - len(prompt):] = prompt
    out["prompt_mask_BxP"][i, p - len(prompt):] = True
    out["completion_tokens_BxC"][i, :len(completion)] = completion
    out["completion_mask_BxC"][i, :len(completion)] = True
  return Batch(**{k: jnp.asarray(v) for k, v in out.items()})


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
@pytest.mark.slow
def test_completion_logprobs_match_unpadded_full_vocab_logits(tiny_llama, with_lora):
  cfg, params = tiny_llama
  lora, scale = _randomize_lora(cfg) if with_lora else (None, 1.0)
  rng = np.random.default_rng(1)
  v = cfg.vocab_size
  # three rows with different prompt / completion lengths, so each row has its own
  # amount of left padding (and one prompt fills P exactly)
  p, c = 7, 5
  rows = [(rng.integers(0, v, n).tolist(), rng.integers(0, v, m).tolist()) for n, m in ((3, 5), (7, 2), (5, 4))]
  batch = _batch(rows, p, c, pad=7)
  # a chunk that does not divide the 49152-token vocabulary
  got = jax.jit(losses.completion_logprobs, static_argnames=("cfg", "chunk", "lora_scale"),
                compiler_options=TINY_JIT)(params, cfg, batch, lora=lora, lora_scale=scale, chunk=5000)
  got = np.asarray(got)
  assert got.shape == (3, c)

  fwd = jax.jit(forward, static_argnames=("cfg", "lora_scale"), compiler_options=TINY_JIT)
  for i, (prompt, completion) in enumerate(rows):
    tokens = jnp.asarray([prompt + completion])
    pos = jnp.arange(tokens.shape[1])[None]
    hidden = fwd(params, cfg, tokens, pos, lora=lora, lora_scale=scale)
    logp = np.asarray(jax.nn.log_softmax(logits(params, cfg, hidden), axis=-1))[0]  # full [T, V]
    # position t predicts token t + 1: the last prompt position predicts completion[0]
    want = [logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(completion)]
    np.testing.assert_allclose(got[i, :len(completion)], want, rtol=1e-4, atol=1e-4, err_msg=f"row {i}")
    # and not the unshifted positions (a real check that the shift matters)
    unshifted = [logp[len(prompt) + j, tok] for j, tok in enumerate(completion[:-1])]
    assert not np.allclose(got[i, :len(completion) - 1], unshifted, atol=1e-3)
    assert np.all(np.isfinite(got[i]))  # padding positions are finite too (masked by the loss)


def test_completion_logprobs_ignore_padding_content(tiny_llama):
  """What sits in the padded slots (prompt left padding, completion tail) changes nothing."""
  cfg, params = tiny_llama
  rng = np.random.default_rng(2)
  rows = [(rng.integers(0, cfg.vocab_size, 3).tolist(), rng.integers(0, cfg.vocab_size, 2).tolist())]
  a = _batch(rows, 6, 4, pad=0)
  b = _batch(rows, 6, 4, pad=12345)
  f = jax.jit(losses.completion_logprobs, static_argnames=("cfg",), compiler_options=TINY_JIT)
  la, lb = np.asarray(f(params, cfg, a)), np.asarray(f(params, cfg, b))
  np.testing.assert_allclose(la[:, :2], lb[:, :2], rtol=1e-5, atol=1e-6)
