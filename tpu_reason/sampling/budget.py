"""s1 budget forcing inside the decode loop: cap the thinking, or extend it with "Wait".

Each row carries a small queue of forced tokens; while it is non-empty the next token
comes from the queue instead of the sampler, so forced text goes through the same cached
decode step as sampled text (no re-prefill). Per generated token (`step`):

  * close detection: the row's last tokens equal a tokenization of the schema's
    reasoning-close tag (token level, as `render_target` lays it out after a newline);
  * extension: a detected close, while extensions and thinking budget remain, is
    suppressed: the row rewinds over the close tokens (their cache slots are forgotten)
    and emits the `wait` tokens in their place;
  * cap: a row still thinking after `max_thinking_tokens` tokens gets the schema's
    `answer_start` (close tag + answer opening) forced, then answers freely;
  * repetition guard: a row still thinking whose last `repeat_ngram` tokens already
    occurred `repeat_times - 1` times in its last `repeat_window` tokens is in a loop
    that would run to the length cap; it gets `answer_start` forced as at the cap.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason.config import BudgetCfg
from tpu_reason.models.transformer import KVCache
from tpu_reason.tags import TagSchema


def active(budget: BudgetCfg | None) -> bool:
  """Whether `budget` forces anything (None or all-zero leaves generation untouched)."""
  return budget is not None and (budget.max_thinking_tokens > 0 or budget.extend > 0 or budget.repeat_ngram > 0)


def label(budget: BudgetCfg) -> str:
  """The eval column suffix of an active budget: +budget (cap / extend), +guard, or both."""
  parts = ["budget"] * (budget.max_thinking_tokens > 0 or budget.extend > 0) + ["guard"] * (budget.repeat_ngram > 0)
  return "".join(f"+{p}" for p in parts)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "close_VxN", "force_F", "force_len", "wait_F", "wait_len", "max_thinking", "extend", "repeat_times"],
    meta_fields=["ngram", "window"])
@dataclasses.dataclass(frozen=True)
class Forcing:
  """Token ids and limits of a budget; jit arguments, so other values never recompile
  (the guard's n-gram and window sizes are shapes: static)."""

  close_VxN: jax.Array  # tokenizations of the reasoning-close tag (all of length N)
  force_F: jax.Array  # the schema's answer_start, forced at the cap (zero-padded)
  force_len: jax.Array  # []
  wait_F: jax.Array  # replaces a suppressed close (zero-padded)
  wait_len: jax.Array  # []
  max_thinking: jax.Array  # [] 0 = no cap
  extend: jax.Array  # [] closes to suppress
  repeat_times: jax.Array  # [] occurrences of the last n-gram that make a loop
  ngram: int = 0  # 0 = no repetition guard
  window: int = 0

  @property
  def rewind(self) -> int:
    """Tokens of a suppressed close already fed before its last token is sampled."""
    return self.close_VxN.shape[1] - 1


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "queue", "head", "qlen", "closed", "thinking", "forced", "extensions", "looped"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class BudgetState:
  """Per-row forcing state carried by the decode loop."""

  queue: jax.Array  # [B, F] forced tokens
  head: jax.Array  # [B] next queue index; the queue is empty when head == qlen
  qlen: jax.Array  # [B]
  closed: jax.Array  # [B] the reasoning is closed (naturally or forced)
  thinking: jax.Array  # [B] tokens before the close (all tokens while open)
  forced: jax.Array  # [B] closes forced by the cap (0 or 1)
  extensions: jax.Array  # [B] closes replaced by `wait`
  looped: jax.Array  # [B] closes forced by the repetition guard (0 or 1)


def _close_variants(encode, close: str) -> list[list[int]]:
  """Token ids of `close` as it follows a newline (the rendered layout) or a space."""
  out = []
  for ctx in ("\n", " "):
    ids, pre = encode(ctx + close), encode(ctx)
    ids = ids[len(pre):] if ids[:len(pre)] == pre else ids
    if ids not in out and (not out or len(ids) == len(out[0])):
      out.append(ids)
  return out


def _padded(ids: list[int], size: int) -> np.ndarray:
  return np.asarray(ids + [0] * (size - len(ids)), np.int32)


def forcing(tokenizer, schema: TagSchema, budget: BudgetCfg | None) -> Forcing:
  """The device-side ids of `budget` for `schema` (a zero budget only tracks the close)."""
  budget = budget or BudgetCfg()
  encode = functools.partial(tokenizer.encode, add_special_tokens=False)
  force, wait = encode(schema.answer_start), encode(budget.wait)
  if budget.extend and not wait:
    raise ValueError(f"budget.wait={budget.wait!r} has no tokens to extend the thinking with")
  size = max(len(force), len(wait), 1)
  return Forcing(
      jnp.asarray(_close_variants(encode, schema.reasoning_close), jnp.int32),
      jnp.asarray(_padded(force, size)), jnp.int32(len(force)), jnp.asarray(_padded(wait, size)),
      jnp.int32(len(wait)), jnp.int32(budget.max_thinking_tokens), jnp.int32(budget.extend),
      jnp.int32(budget.repeat_times), budget.repeat_ngram, budget.repeat_window if budget.repeat_ngram else 0)


def init(f: Forcing, batch: int) -> BudgetState:
  """Every row open, nothing queued."""
  zeros = jnp.zeros((batch,), jnp.int32)
  return BudgetState(jnp.zeros((batch, f.force_F.shape[0]), jnp.int32), zeros, zeros,
                     jnp.zeros((batch,), bool), zeros, zeros, zeros, zeros)


def _closes(f: Forcing, tokens_BxN, lengths_B, tok_B):
  """Whether `tok` completes a close tag after the row's `lengths` tokens."""
  n = f.close_VxN.shape[1]
  idx_BxM = lengths_B[:, None] + jnp.arange(1 - n, 0)
  prev_BxM = jnp.take_along_axis(tokens_BxN, jnp.maximum(idx_BxM, 0), axis=1)
  recent_BxN = jnp.concatenate([prev_BxM, tok_B[:, None]], axis=1)
  match = jnp.all(recent_BxN[:, None, :] == f.close_VxN[None], axis=-1).any(-1)
  return match & (lengths_B >= n - 1)


def _looping(f: Forcing, tokens_BxN, length_B, tok_B):
  """Whether each row's last `ngram` tokens (`tok` the newest, `length` in all) occurred
  `repeat_times - 1` times before within its last `window` tokens."""
  n, w = f.ngram, f.window
  pos_BxW = length_B[:, None] - w + jnp.arange(w)
  win_BxW = jnp.take_along_axis(tokens_BxN, jnp.clip(pos_BxW, 0, tokens_BxN.shape[1] - 1), axis=1)
  win_BxW = jnp.where(pos_BxW == length_B[:, None] - 1, tok_B[:, None], win_BxW)
  win_BxW = jnp.where(pos_BxW >= 0, win_BxW, -1)  # before the first token: matches nothing
  earlier_BxJxN = win_BxW[:, jnp.arange(w - n)[:, None] + jnp.arange(n)]
  last_BxN = win_BxW[:, w - n:]
  hits_BxJ = jnp.all(earlier_BxJxN == last_BxN[:, None], axis=-1) & (earlier_BxJxN[..., 0] >= 0)
  return (length_B >= n) & (hits_BxJ.sum(-1) >= f.repeat_times - 1)


def _enqueue(b: BudgetState, rows_B, ids_F, n, skip: int) -> BudgetState:
  """Rows in `rows_B` get ids[skip:n] as their queue."""
  queue = jnp.where(rows_B[:, None], jnp.roll(ids_F, -skip)[None], b.queue)
  return dataclasses.replace(b, queue=queue, head=jnp.where(rows_B, 0, b.head),
                             qlen=jnp.where(rows_B, n - skip, b.qlen))


def step(f: Forcing, b: BudgetState, tokens_BxN, lengths_B, sampled_B, alive_B):
  """Force one token per row: (token, state, rewind_B) where rewind_B tokens are taken back."""
  queued = alive_B & (b.head < b.qlen)
  tok = jnp.where(queued, jnp.take_along_axis(b.queue, b.head[:, None], axis=1)[:, 0], sampled_B)
  b = dataclasses.replace(b, head=b.head + queued)
  hit = alive_B & ~queued & ~b.closed & _closes(f, tokens_BxN, lengths_B, tok)
  start = lengths_B - f.rewind  # index of the close's first token
  under = (f.max_thinking == 0) | (start < f.max_thinking)
  wait = hit & (b.extensions < f.extend) & under
  close = hit & ~wait
  tok = jnp.where(wait, f.wait_F[0], tok)
  b = _enqueue(b, wait, f.wait_F, f.wait_len, 1)
  rewind = jnp.where(wait, f.rewind, 0)
  length = lengths_B - rewind + alive_B  # after appending `tok`
  closed = b.closed | close
  thinking = jnp.where(close, start, jnp.where(closed, b.thinking, length))
  free = alive_B & ~closed & (b.head >= b.qlen)  # thinking, nothing queued
  cap = free & (f.max_thinking > 0) & (length >= f.max_thinking)
  loop = free & ~cap & _looping(f, tokens_BxN, length, tok) if f.ngram else jnp.zeros_like(cap)
  b = _enqueue(b, cap | loop, f.force_F, f.force_len, 0)
  b = dataclasses.replace(b, closed=closed | cap | loop, thinking=thinking, forced=b.forced + cap,
                          extensions=b.extensions + wait, looped=b.looped + loop)
  return tok, b, rewind


def unsettled(f: Forcing, b: BudgetState, tokens_BxN: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
  """Host side: per row, trailing tokens that start a close tag a suppression may take back."""
  close_VxN, out = np.asarray(f.close_VxN), np.zeros(len(lengths_B), np.int64)
  for i in np.flatnonzero(~b.closed & (b.extensions < int(f.extend))):
    n = lengths_B[i]
    out[i] = next((k for k in range(min(close_VxN.shape[1] - 1, n), 0, -1)
                   if (close_VxN[:, :k] == tokens_BxN[i, n - k:n]).all(1).any()), 0)
  return out


def forget(cache: KVCache, rewind_B, next_pos_B) -> KVCache:
  """Invalidate the slots of rewound tokens: those at positions >= the row's next position."""
  drop_BxS = (rewind_B > 0)[:, None] & (cache.pos >= next_pos_B[:, None])
  return dataclasses.replace(cache, valid=cache.valid & ~drop_BxS)
