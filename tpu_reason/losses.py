"""Token log-probabilities over the vocabulary in chunks, the SFT loss, and GRPO's maths.

A [B, T, V] f32 logits tensor is never materialised: Gemma-3's 262k vocabulary would
make it gigabytes. The vocabulary is scanned in chunks with an online logsumexp.

GRPO: group advantages (scaled per `choices.ADVANTAGE_SCALES`, or each reward normalised
first), the k3 KL, token- or sequence-level (GSPO) importance ratios, the clipped surrogate,
its aggregation into one loss (`choices.GRPO_LOSSES`) and DAPO's overlong penalty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tpu_reason import choices
from tpu_reason.data.batch import Batch, PackedBatch
from tpu_reason.models.transformer import forward, head_weights, positions
from tpu_reason.sharding import constrain


def token_logprobs(hidden_BxTxD, w_DxV, targets_BxT, *, chunk: int = 8192, softcap: float | None = None,
                   temperature: float = 1.0):
  """log p(target) per position, computed over vocabulary chunks of `chunk` columns."""
  d, v = w_DxV.shape
  chunk = min(chunk, v)
  n = -(-v // chunk)
  w = jnp.pad(w_DxV, ((0, 0), (0, n * chunk - v))).reshape(d, n, chunk).transpose(1, 0, 2)
  h = constrain(hidden_BxTxD, ("batch", "seq", "act_embed"))

  def body(carry, xs):
    run_max, run_sum, tgt = carry
    w_c, i = xs
    # each chip: its own rows against this chunk's vocabulary columns of its tp share
    w_c = constrain(w_c, ("act_embed", "vocab"))
    lg = constrain(jnp.einsum("btd,dv->btv", h, w_c.astype(h.dtype)).astype(jnp.float32), ("batch", "seq", "vocab"))
    if softcap is not None:
      lg = softcap * jnp.tanh(lg / softcap)
    lg = lg / temperature
    col = i * chunk + jnp.arange(chunk)
    lg = jnp.where(col < v, lg, -jnp.inf)  # padding columns of the last chunk
    new_max = jnp.maximum(run_max, lg.max(-1))
    run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(lg - new_max[..., None]).sum(-1)
    hit = col[None, None, :] == targets_BxT[..., None]
    tgt = tgt + jnp.sum(jnp.where(hit, lg, 0.0), -1)
    return (new_max, run_sum, tgt), None

  b, t = targets_BxT.shape
  init = (jnp.full((b, t), -jnp.inf, jnp.float32), jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), jnp.float32))
  # remat each chunk: the backward recomputes its logits instead of storing n of them
  (run_max, run_sum, tgt), _ = jax.lax.scan(jax.checkpoint(body), init, (w, jnp.arange(n)))
  return tgt - (run_max + jnp.log(run_sum))


def masked_mean(x_BxT, mask_BxT):
  """Mean over the True entries (0 when there are none)."""
  mask = mask_BxT.astype(jnp.float32)
  return jnp.sum(jnp.where(mask_BxT, x_BxT, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_loss(logp_BxT, mask_BxT):
  """Token-mean negative log-likelihood over completion tokens (incl. EOS)."""
  return -masked_mean(logp_BxT, mask_BxT)


def completion_logprobs(params, cfg, batch: Batch, *, lora=None, lora_scale=1.0, dtype=jnp.float32,
                        remat="none", chunk=8192, temperature=1.0):
  """log p(completion token) [B, C] for a left-padded prompt + right-padded completion batch."""
  prompt, completion = batch.prompt_tokens_BxP, batch.completion_tokens_BxC
  p, c = prompt.shape[1], completion.shape[1]
  tokens = jnp.concatenate([prompt, completion], axis=1)
  valid = jnp.concatenate([batch.prompt_mask_BxP, batch.completion_mask_BxC], axis=1)
  pos = positions(valid)
  hidden = forward(params, cfg, tokens, pos, valid_BxT=valid, lora=lora, lora_scale=lora_scale,
                   dtype=dtype, remat=remat)
  # hidden at t predicts token t+1: the last prompt position predicts the first completion token
  h = hidden[:, p - 1: p + c - 1]
  return token_logprobs(h, head_weights(params, cfg, lora), completion, chunk=chunk, softcap=cfg.final_softcap,
                        temperature=temperature)


def packed_logprobs(params, cfg, batch: PackedBatch, *, lora=None, lora_scale=1.0, dtype=jnp.float32, remat="none",
                    chunk=8192):
  """log p(completion token) [B, C] for packed rows (see `data.packing.pack`): each segment sees only itself."""
  tokens, segments, at = batch.tokens_BxL, batch.segments_BxL, batch.target_at_BxC
  hidden = forward(params, cfg, tokens, batch.positions_BxL, valid_BxT=segments > 0, lora=lora,
                   lora_scale=lora_scale, dtype=dtype, remat=remat, segment_BxT=segments)
  # the vocabulary head runs only where the loss looks, not on the prompts in between
  h = jnp.take_along_axis(hidden, at[..., None], axis=1)
  return token_logprobs(h, head_weights(params, cfg, lora), jnp.take_along_axis(tokens, at + 1, axis=1), chunk=chunk,
                        softcap=cfg.final_softcap)


def sft_logprobs(params, cfg, batch: Batch | PackedBatch, **kw):
  """log p of each completion token [B, C] in either batch layout (packed rows or prompt + completion)."""
  if isinstance(batch, PackedBatch):
    return packed_logprobs(params, cfg, batch, **kw)
  return completion_logprobs(params, cfg, batch, **kw)


# --------------------------------------------------------------------------- GRPO maths


def group_advantages(rewards_B, group: int, *, scale: str = "group", eps: float = 1e-4, ddof: int = 0):
  """(r - group mean) / (std + eps); `scale` (`choices.ADVANTAGE_SCALES`): group | batch (one std for all) |
  none (Dr. GRPO).

  `ddof=0` is the population std; `ddof=1` the sample std TRL uses (at G=4 its advantages
  are sqrt(3/4) = 0.866x ours)."""
  r = rewards_B.reshape(-1, group)
  centered = r - r.mean(axis=1, keepdims=True)
  if scale == "group":
    centered = centered / (r.std(axis=1, keepdims=True, ddof=ddof) + eps)
  elif scale == "batch":
    centered = centered / (rewards_B.std(ddof=ddof) + eps)
  elif scale != "none":
    raise ValueError(f"unknown advantage scale {scale!r}: {' | '.join(choices.ADVANTAGE_SCALES)}")
  return centered.reshape(-1)


def kl_k3(logp_BxT, ref_logp_BxT):
  """Schulman's k3 estimator of KL(policy || ref): exp(ref - p) - (ref - p) - 1, always >= 0."""
  d = ref_logp_BxT - logp_BxT
  return jnp.exp(d) - d - 1.0


def log_ratio(logp_BxT, old_logp_BxT, mask_BxT=None, level: str = "token"):
  """log(pi / pi_old) per token, or GSPO's (`level="sequence"`) one per completion: the mean over its
  tokens, given to each of them. The reward is per sequence, so GSPO weighs the whole sequence; the
  mean (not the sum) keeps long completions' ratios near 1."""
  d = logp_BxT - old_logp_BxT
  if level == "token":
    return d
  if level == "sequence":
    mask = mask_BxT.astype(jnp.float32)
    per_seq = (d * mask).sum(1, keepdims=True) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    return jnp.broadcast_to(per_seq, d.shape)
  raise ValueError(f"unknown importance level {level!r}: {' | '.join(choices.IMPORTANCE_LEVELS)}")


def clipped_surrogate(logp_BxT, old_logp_BxT, adv_B, eps_low: float, eps_high: float, *, level: str = "token",
                      mask_BxT=None):
  """Per-token PPO objective to MINIMISE: -min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A).

  `level`/`mask_BxT`: the ratio per token or per sequence (`log_ratio`). Returns (loss_BxT,
  clipped_low_BxT, clipped_high_BxT) where the clip flags mark tokens whose gradient the clip
  removed (ratio below 1-eps_low with A<0, above 1+eps_high with A>0).
  """
  ratio = jnp.exp(log_ratio(logp_BxT, old_logp_BxT, mask_BxT, level))
  adv = adv_B[:, None]
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  loss = -jnp.minimum(unclipped, clipped)
  low = (ratio < 1.0 - eps_low) & (adv < 0)
  high = (ratio > 1.0 + eps_high) & (adv > 0)
  return loss, low, high


def truncated_is_weight(trainer_logp_BxT, sampler_logp_BxT, cap: float):
  """Truncated importance sampling (TIS): min(pi_trainer / pi_sampler, cap) per token, no gradient. The
  sampler's numerics (merged bf16 weights) are not the trainer's; this reweighs its samples toward the policy
  being trained, capped so a token the sampler found unlikely cannot dominate."""
  d = jax.lax.stop_gradient(trainer_logp_BxT - sampler_logp_BxT)
  return jnp.minimum(jnp.exp(d), cap)


def aggregate(loss_BxT, mask_BxT, mode: str, max_tokens: int | None = None, num_tokens=None):
  """Token losses -> scalar: grpo (mean over sequences of token-means), dapo (token-mean over
  the batch, or token-sum / `num_tokens` when the batch is a micro-slice of a larger one),
  dr_grpo (token-sum / (batch * max_tokens), a constant normaliser)."""
  mask = mask_BxT.astype(jnp.float32)
  tokens = loss_BxT * mask
  if mode == "grpo":
    per_seq = tokens.sum(1) / jnp.maximum(mask.sum(1), 1.0)
    return per_seq.mean()
  if mode == "dapo":
    return tokens.sum() / jnp.maximum(mask.sum() if num_tokens is None else num_tokens, 1.0)
  if mode == "dr_grpo":
    return tokens.sum() / (loss_BxT.shape[0] * (max_tokens or loss_BxT.shape[1]))
  raise ValueError(f"unknown loss aggregation {mode!r}: {' | '.join(choices.GRPO_LOSSES)}")


def overlong_penalty(lengths_B, max_tokens: int, buffer: int, penalty: float = 1.0):
  """DAPO's soft overlong penalty: 0 up to `max_tokens - buffer` tokens, then linear down to
  -`penalty` at the cap, so a completion nearing the cap is told so before it is cut."""
  excess = jnp.asarray(lengths_B, jnp.float32) - (max_tokens - buffer)
  return -penalty * jnp.clip(excess / buffer, 0.0, 1.0)


def normalize_each(rewards_KxB, weights_K, group: int, *, eps: float = 1e-4, ddof: int = 0):
  """GDPO-style sum: each of K rewards normalised within its groups, then weighted: [B]. A reward
  with a wide range (or one that rarely varies) then no longer drowns the others' signal."""
  return sum(w * group_advantages(r, group, eps=eps, ddof=ddof) for r, w in zip(rewards_KxB, weights_K))
