"""Batched generation with a KV cache at fixed shapes.

The prompt batch is prefilled once into a `prefix` cache; with `group=G` every prompt
is decoded G times, all G samples reading the same prefix rows (GRPO rollouts).
Decoding runs as a jitted `while_loop` in chunks: between chunks the host checks stop
strings, streams text and updates progress. Shapes depend only on
(batch, prompt length, max_new_tokens, group), so repeated calls never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason.config import SamplingCfg
from tpu_reason.models.transformer import KVCache, ModelConfig, forward, init_cache, logits, positions, write


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "suffix", "tokens", "last", "pos", "step", "done", "lengths", "key"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """Everything the decode loop carries; `suffix` caches the generated tokens."""

  suffix: KVCache  # [L, B*G, N, K, H]
  tokens: jax.Array  # [B*G, N] generated ids (pad after the end)
  last: jax.Array  # [B*G] last token, input to the next step
  pos: jax.Array  # [B*G] position of the next token
  step: jax.Array  # [] number of tokens generated so far
  done: jax.Array  # [B*G] hit an EOS (or a stop string, set by the host)
  lengths: jax.Array  # [B*G] generated tokens incl. the EOS
  key: jax.Array


@dataclasses.dataclass
class Generation:
  """Host-side result of `generate`."""

  tokens: np.ndarray  # [B*G, N] int32, pad after `lengths`
  lengths: np.ndarray  # [B*G]
  finished: np.ndarray  # [B*G] ended by EOS or stop string (else hit the length cap)
  texts: list[str]
  seconds: float

  @property
  def truncated(self) -> np.ndarray:
    return ~self.finished

  @property
  def mask(self) -> np.ndarray:
    return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

  @property
  def tokens_per_second(self) -> float:
    return float(self.lengths.sum()) / max(self.seconds, 1e-9)


def _mode(sampling: SamplingCfg) -> tuple[float, int, float]:
  """The sampling fields that change the compiled graph (the seed must not)."""
  return (sampling.temperature, sampling.top_k, sampling.top_p)


def sample_token(logits_BxV, key, temperature: float, top_k: int, top_p: float):
  """Greedy when temperature == 0, else temperature / top-k / top-p sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  x = logits_BxV.astype(jnp.float32) / temperature
  if top_k == 0 and top_p == 1.0:
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
  # sample among the k best only: a [B, k] draw instead of a full-vocabulary one
  x, ids = jax.lax.top_k(x, top_k or x.shape[-1])
  if top_p < 1.0:
    cum = jnp.cumsum(jax.nn.softmax(x, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    last = jnp.minimum(jnp.sum(cum < top_p, axis=-1, keepdims=True), x.shape[-1] - 1)
    cutoff = jnp.take_along_axis(x, last, axis=-1)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  choice = jax.random.categorical(key, x, axis=-1)
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def prefill(params, lora, lora_scale, tokens_BxP, mask_BxP, *, cfg: ModelConfig, dtype=jnp.float32):
  """Run the (left-padded) prompts once: their cache and last-token logits."""
  pos = positions(mask_BxP)
  hidden, (k, v) = forward(params, cfg, tokens_BxP, pos, valid_BxT=mask_BxP, lora=lora,
                           lora_scale=lora_scale, dtype=dtype, return_kv=True)
  cache = init_cache(cfg, tokens_BxP.shape[0], tokens_BxP.shape[1], dtype)
  cache = write(cache, k, v, pos, mask_BxP, 0)
  return cache, logits(params, cfg, hidden[:, -1:])[:, 0], pos[:, -1] + 1


@functools.partial(jax.jit, static_argnames=("cfg", "group", "max_new", "mode", "dtype"))
def start(prefix: KVCache, first_logits_BxV, next_pos_B, key, *, cfg: ModelConfig, group: int,
          max_new: int, mode: tuple, eos_ids, dtype=jnp.float32) -> DecodeState:
  """Sample each row's first token (G different ones per prompt) and set up the loop."""
  b = first_logits_BxV.shape[0] * group
  key, sub = jax.random.split(key)
  first = sample_token(jnp.repeat(first_logits_BxV, group, 0), sub, *mode)
  tokens = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos_ids)
  return DecodeState(init_cache(cfg, b, max_new, dtype), tokens, first, jnp.repeat(next_pos_B, group),
                     jnp.array(1, jnp.int32), done, jnp.ones((b,), jnp.int32), key)


@functools.partial(jax.jit, static_argnames=("cfg", "mode", "span", "dtype"), donate_argnames=("state",))
def decode(params, lora, lora_scale, prefix: KVCache, state: DecodeState, until, eos_ids, pad_id,
           *, cfg: ModelConfig, mode: tuple, span: int | None = None, dtype=jnp.float32) -> DecodeState:
  """Generate until step == `until` or every row is done, attending over `span` >= `until` suffix slots."""
  max_new = state.tokens.shape[1]

  def cond(s):
    return (s.step < until) & (s.step < max_new) & ~jnp.all(s.done)

  def body(s):
    # the last token goes into slot step-1 of the suffix cache while being processed
    tok, pos = s.last[:, None], s.pos[:, None]
    alive = ~s.done
    caches = (prefix, dataclasses.replace(s.suffix, span=span))
    hidden, (k, v) = forward(params, cfg, tok, pos, valid_BxT=alive[:, None], lora=lora,
                             lora_scale=lora_scale, caches=caches, dtype=dtype, return_kv=True)
    suffix = write(s.suffix, k, v, pos, alive[:, None], s.step - 1)
    key, sub = jax.random.split(s.key)
    nxt = sample_token(logits(params, cfg, hidden)[:, 0], sub, *mode)
    nxt = jnp.where(alive, nxt, pad_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, nxt[:, None], s.step, axis=1)
    done = s.done | jnp.isin(nxt, eos_ids)
    return DecodeState(suffix, tokens, nxt, s.pos + 1, s.step + 1, done, s.lengths + alive, key)

  return jax.lax.while_loop(cond, body, state)


def _span(step: int, slots: int) -> int:
  """Suffix slots a decode call from `step` attends over: the next power-of-two bucket from 64.

  Early steps then skip the empty tail of the cache, at the cost of one compile per bucket.
  """
  span = 64
  while span <= step:
    span *= 2
  return min(span, slots)


def _stop_length(tokenizer, ids: np.ndarray, stops: tuple[str, ...], start: int) -> int | None:
  """Smallest token count >= start whose text contains a stop string (None if none does)."""
  if not stops or not any(s in tokenizer.decode(ids) for s in stops):
    return None
  for n in range(max(start, 1), len(ids) + 1):
    if any(s in tokenizer.decode(ids[:n]) for s in stops):
      return n
  return len(ids)


def generate(
    params,
    cfg: ModelConfig,
    tokenizer,
    prompt_tokens_BxP: np.ndarray,
    prompt_mask_BxP: np.ndarray,
    *,
    eos_ids: tuple[int, ...],
    sampling: SamplingCfg,
    key: jax.Array | None = None,
    lora=None,
    lora_scale: float = 1.0,
    group: int = 1,
    stop_strings: tuple[str, ...] = (),
    chunk: int = 64,
    on_chunk: Callable[[np.ndarray, np.ndarray], None] | None = None,
    dtype=jnp.float32,
) -> Generation:
  """Generate up to `sampling.max_new_tokens` tokens for each prompt, `group` times."""
  t0 = time.perf_counter()
  key = jax.random.key(sampling.seed) if key is None else key
  eos = jnp.asarray(eos_ids, jnp.int32)
  pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0])
  prefix, first, next_pos = prefill(params, lora, lora_scale, jnp.asarray(prompt_tokens_BxP),
                                    jnp.asarray(prompt_mask_BxP, bool), cfg=cfg, dtype=dtype)
  prefix = KVCache(prefix.k, prefix.v, prefix.valid, prefix.pos, group)
  max_new = sampling.max_new_tokens
  state = start(prefix, first, next_pos, key, cfg=cfg, group=group, max_new=max_new,
                mode=_mode(sampling), eos_ids=eos, dtype=dtype)
  stopped = np.zeros(state.done.shape, bool)
  stop_len = np.zeros(state.done.shape, np.int64)
  step = 1
  while True:
    if stop_strings or on_chunk is not None:
      tokens, done, lengths = jax.device_get((state.tokens, state.done, state.lengths))
      for i in np.flatnonzero(~done & ~stopped) if stop_strings else ():
        n = _stop_length(tokenizer, tokens[i, : lengths[i]], stop_strings, step - chunk)
        if n is not None:
          stopped[i], stop_len[i] = True, n
      if stopped.any():
        state = dataclasses.replace(state, done=state.done | jnp.asarray(stopped))
      if on_chunk is not None:
        on_chunk(tokens, np.where(stopped, stop_len, lengths))
    if step >= max_new or bool(jnp.all(state.done)):
      break
    span = _span(step, max_new)
    step = min(step + chunk, span)
    state = decode(params, lora, lora_scale, prefix, state, step, eos, pad, cfg=cfg, mode=_mode(sampling),
                   span=span, dtype=dtype)
  tokens, done, lengths = jax.device_get((state.tokens, state.done, state.lengths))
  lengths = np.where(stopped, np.minimum(stop_len, lengths), lengths)
  tokens = np.where(np.arange(tokens.shape[1])[None] < lengths[:, None], tokens, pad).astype(np.int32)
  finished = done | stopped
  texts = [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(tokens, lengths)]
  return Generation(tokens, lengths.astype(np.int32), finished, texts, time.perf_counter() - t0)


def left_pad(ids_list: list[list[int]], length: int | None, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to a fixed length: (tokens_BxP, mask_BxP)."""
  from tpu_reason.data.buckets import left_pad as left_pad_row

  length = length or max(len(x) for x in ids_list)
  for i, ids in enumerate(ids_list):
    if len(ids) > length:
      raise ValueError(f"prompt {i} has {len(ids)} tokens > {length}")
  rows = [left_pad_row(ids, length, pad_id) for ids in ids_list]
  return np.stack([t for t, _ in rows]), np.stack([m for _, m in rows])
