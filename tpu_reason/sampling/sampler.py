"""Batched generation with a KV cache at fixed shapes.

The prompt batch is prefilled once into a `prefix` cache; with `group=G` every prompt
is decoded G times, all G samples reading the same prefix rows (GRPO rollouts).
Decoding runs as a jitted `while_loop` in chunks: between chunks the host checks stop
strings, streams text and updates progress. Shapes depend only on
(batch, prompt length, max_new_tokens, group), so repeated calls never recompile.
With a tag schema the loop also tracks each row's reasoning and applies budget forcing
(`tpu_reason.sampling.budget`) in-graph.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason.config import BudgetCfg, SamplingCfg
from tpu_reason.distributed import to_host
from tpu_reason.models.transformer import KVCache, ModelConfig, forward, init_cache, logits, positions, write
from tpu_reason.padding import left_pad as left_pad_row
from tpu_reason.sampling import budget as budget_lib
from tpu_reason.sampling.budget import BudgetState, Forcing
from tpu_reason.sharding import constrain
from tpu_reason.tags import TagSchema


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "suffix", "tokens", "logps", "last", "pos", "step", "done", "lengths", "key", "budget"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """Everything the decode loop carries; `suffix` caches the fed tokens, one slot per step."""

  suffix: KVCache  # [L, B*G, ..., S] with S = N + slots for rewound tokens
  tokens: jax.Array  # [B*G, N] generated ids (pad after the end)
  logps: jax.Array  # [B*G, N] f32 log-prob of each generated id under the sampling temperature (0 after the end)
  last: jax.Array  # [B*G] last token, input to the next step
  pos: jax.Array  # [B*G] position of `last`
  step: jax.Array  # [] decode steps so far (tokens generated, unless budget forcing rewound some)
  done: jax.Array  # [B*G] hit an EOS (or a stop string, set by the host)
  lengths: jax.Array  # [B*G] generated tokens incl. the EOS
  key: jax.Array
  budget: BudgetState | None  # only with a tag schema


@dataclasses.dataclass
class Generation:
  """Host-side result of `generate`."""

  tokens: np.ndarray  # [B*G, N] int32, pad after `lengths`
  lengths: np.ndarray  # [B*G]
  finished: np.ndarray  # [B*G] ended by EOS or stop string (else hit the length cap)
  texts: list[str]
  seconds: float
  # [B*G, N] f32 log p of each token under the sampler's weights at its temperature (0 after `lengths`): beside
  # the trainer's own log-probs of the same tokens it shows how far the two numerics are apart
  logprobs: np.ndarray | None = None
  # with a tag schema (else None):
  thinking_tokens: np.ndarray | None = None  # [B*G] tokens before the reasoning close
  forced_closes: np.ndarray | None = None  # [B*G] closes forced by the thinking cap (0 or 1)
  extensions: np.ndarray | None = None  # [B*G] closes replaced by the budget's wait string
  unclosed: np.ndarray | None = None  # [B*G] the reasoning was never (completely) closed
  loop_closes: np.ndarray | None = None  # [B*G] closes forced by the repetition guard (0 or 1)

  @property
  def truncated(self) -> np.ndarray:
    return ~self.finished

  @property
  def mask(self) -> np.ndarray:
    return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

  @property
  def tokens_per_second(self) -> float:
    return float(self.lengths.sum()) / max(self.seconds, 1e-9)


def sampling_mode(sampling: SamplingCfg) -> tuple[float, int, float]:
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


def token_logprob(logits_BxV, tok_B, temperature: float):
  """log p(tok) at the sampling temperature over the whole vocabulary (not top-k / top-p's cut): the
  quantity the trainer scores (`losses.token_logprobs`); greedy decoding reports it at temperature 1."""
  x = logits_BxV.astype(jnp.float32) / (temperature or 1.0)
  return jnp.take_along_axis(x, tok_B[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(x, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def prefill(params, lora, lora_scale, tokens_BxP, mask_BxP, *, cfg: ModelConfig, dtype=jnp.float32):
  """Run the (left-padded) prompts once: their cache and last-token logits."""
  pos = positions(mask_BxP)
  hidden, (k, v) = forward(params, cfg, tokens_BxP, pos, valid_BxT=mask_BxP, lora=lora,
                           lora_scale=lora_scale, dtype=dtype, return_kv=True)
  cache = init_cache(cfg, tokens_BxP.shape[0], tokens_BxP.shape[1], dtype)
  cache = write(cache, k, v, pos, mask_BxP, 0)
  return cache, logits(params, cfg, hidden[:, -1:], lora)[:, 0], pos[:, -1] + 1


def alive(s: DecodeState):
  """Rows still generating: no EOS or stop yet, and room left in the token buffer."""
  return ~s.done & (s.lengths < s.tokens.shape[1])


def _append(s: DecodeState, logits_BxV, sampled_B, temperature: float, forcing: Forcing | None, eos_ids, pad_id):
  """Add one token to every live row (forced or `sampled`) and its log-prob: (state, rewind_B)."""
  live = alive(s)
  tok, b, rewind = sampled_B, s.budget, jnp.zeros_like(s.lengths)
  if forcing is not None:
    tok, b, rewind = budget_lib.step(forcing, b, s.tokens, s.lengths, sampled_B, live)
  lengths = s.lengths - rewind
  rows = jnp.arange(lengths.shape[0])
  at = jnp.where(live, lengths, s.tokens.shape[1])
  tokens = s.tokens.at[rows, at].set(tok, mode="drop")
  logps = s.logps.at[rows, at].set(token_logprob(logits_BxV, tok, temperature), mode="drop")
  done = s.done | (live & jnp.isin(tok, eos_ids))
  s = dataclasses.replace(s, tokens=tokens, logps=logps, last=jnp.where(live, tok, pad_id), done=done,
                          lengths=lengths + live, budget=b)
  return s, rewind


@functools.partial(jax.jit, static_argnames=("cfg", "group", "max_new", "slots", "mode", "dtype"))
def start(prefix: KVCache, first_logits_BxV, next_pos_B, key, forcing: Forcing | None = None, *,
          cfg: ModelConfig, group: int, max_new: int, mode: tuple, eos_ids, pad_id,
          slots: int | None = None, dtype=jnp.float32) -> DecodeState:
  """Sample each row's first token (G different ones per prompt) and set up the loop.

  `slots` (default `max_new`) sizes the suffix cache: budget forcing needs a few more
  steps than tokens, since a suppressed close costs the steps that fed it.
  """
  b = first_logits_BxV.shape[0] * group
  key, sub = jax.random.split(key)
  logits_BxV = jnp.repeat(first_logits_BxV, group, 0)
  first = sample_token(logits_BxV, sub, *mode)
  rows = lambda x: constrain(x, ("batch",) + ("seq",) * (x.ndim - 1))  # noqa: E731  each chip: its own rows
  zeros = rows(jnp.zeros((b,), jnp.int32))
  state = DecodeState(init_cache(cfg, b, slots or max_new, dtype), rows(jnp.zeros((b, max_new), jnp.int32)),
                      rows(jnp.zeros((b, max_new), jnp.float32)), zeros, rows(jnp.repeat(next_pos_B, group)),
                      jnp.array(1, jnp.int32), rows(jnp.zeros((b,), bool)), zeros, key,
                      None if forcing is None else budget_lib.init(forcing, b))
  return _append(state, logits_BxV, first, mode[0], forcing, eos_ids, pad_id)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "mode", "span", "dtype"), donate_argnames=("state",))
def decode(params, lora, lora_scale, prefix: KVCache, state: DecodeState, until, eos_ids, pad_id,
           forcing: Forcing | None = None, *, cfg: ModelConfig, mode: tuple, span: int | None = None,
           dtype=jnp.float32) -> DecodeState:
  """Generate until step == `until` or every row is done, attending over `span` >= `until` suffix slots."""
  slots = state.suffix.v.shape[3]

  def cond(s):
    return (s.step < until) & (s.step < slots) & jnp.any(alive(s))

  def body(s):
    # the last token goes into slot step-1 of the suffix cache while being processed
    tok, pos, live = s.last[:, None], s.pos[:, None], alive(s)
    caches = (prefix, dataclasses.replace(s.suffix, span=span))
    hidden, (k, v) = forward(params, cfg, tok, pos, valid_BxT=live[:, None], lora=lora,
                             lora_scale=lora_scale, caches=caches, dtype=dtype, return_kv=True)
    suffix = write(s.suffix, k, v, pos, live[:, None], s.step - 1)
    key, sub = jax.random.split(s.key)
    logits_BxV = logits(params, cfg, hidden, lora)[:, 0]
    sampled = sample_token(logits_BxV, sub, *mode)
    s, rewind = _append(dataclasses.replace(s, suffix=suffix, key=key), logits_BxV, sampled, mode[0], forcing,
                        eos_ids, pad_id)
    next_pos = s.pos + 1 - rewind
    if forcing is not None:
      suffix = budget_lib.forget(suffix, rewind, next_pos)
    return dataclasses.replace(s, suffix=suffix, pos=next_pos, step=s.step + 1)

  return jax.lax.while_loop(cond, body, state)


def pow2_bucket(n: int, cap: int | None = None, smallest: int = 64) -> int:
  """The smallest power of two >= n (at least `smallest`), capped at `cap`: little padding, few shapes."""
  width = smallest
  while width < n:
    width *= 2
  return width if cap is None else min(width, cap)


# The one prompt-width rule (eval, chat, curation, `generate`, GRPO's trim): a power of two from 64.
# Every distinct width compiles prefill, start and decode anew, and decode is the expensive compile;
# powers of two give log2(P/64) + 1 widths for prompts up to P tokens (multiples of 64 would give P/64),
# at the cost of up to twice the prompt's columns in the prefix cache that each decode step attends over.
PROMPT_FLOOR = 64


def prompt_width(n_tokens: int, cap: int | None = None) -> int:
  """The width prompts of up to `n_tokens` tokens are left-padded to for generation (at most `cap`).

  Callers pass the longest prompt of the batch, so no prompt token is ever cut (a `cap` below
  `n_tokens` is the caller's error, and `left_pad` raises on it)."""
  return pow2_bucket(n_tokens, cap, PROMPT_FLOOR)


def _span(step: int, slots: int) -> int:
  """Suffix slots a decode call from `step` attends over: the next power-of-two bucket from 64.

  Early steps then skip the empty tail of the cache, at the cost of one compile per bucket.
  """
  return pow2_bucket(step + 1, slots)


def _stop_length(tokenizer, ids: np.ndarray, stops: tuple[str, ...]) -> int | None:
  """Smallest token count whose text contains a stop string (None if none does)."""
  def has_stop(n: int) -> bool:
    return any(s in tokenizer.decode(ids[:n]) for s in stops)

  if not has_stop(len(ids)):
    return None
  return bisect.bisect_left(range(len(ids) + 1), True, key=has_stop)  # longer prefixes keep it


def _check_stops(tokenizer, state: DecodeState, forcing: Forcing | None, stops, stop_len: np.ndarray,
                 on_chunk) -> DecodeState:
  """Between chunks: end rows whose text reached a stop string (`stop_len` > 0) and stream."""
  tokens, done, lengths, b = to_host((state.tokens, state.done, state.lengths, state.budget))
  for i in np.flatnonzero(~done & (stop_len == 0)) if stops else ():
    stop_len[i] = _stop_length(tokenizer, tokens[i, : lengths[i]], stops) or 0
  if stop_len.any():
    state = dataclasses.replace(state, done=state.done | jnp.asarray(stop_len > 0))
  if on_chunk is not None:
    # hold back the start of a close tag that may yet be suppressed: streamed text only grows
    settled = lengths - (0 if b is None else budget_lib.unsettled(forcing, b, tokens, lengths))
    on_chunk(tokens, np.where(stop_len > 0, stop_len, settled))
  return state


def _forcing(tokenizer, schema: TagSchema | None, budget: BudgetCfg | None) -> Forcing | None:
  if schema is None and budget_lib.active(budget):
    raise ValueError("budget forcing needs the tag schema whose reasoning it caps (schema=...)")
  return None if schema is None else budget_lib.forcing(tokenizer, schema, budget)


def _result(tokenizer, state: DecodeState, stop_len: np.ndarray, pad: int, t0: float) -> Generation:
  """Host-side Generation: cut at stop strings, pad after the end, decode texts; seconds since `t0`."""
  tokens, logps, done, lengths, b = to_host((state.tokens, state.logps, state.done, state.lengths, state.budget))
  seconds = time.perf_counter() - t0  # the fetch above waited for the last decode chunk to run
  stopped = stop_len > 0
  lengths = np.where(stopped, np.minimum(stop_len, lengths), lengths).astype(np.int32)
  kept = np.arange(tokens.shape[1])[None] < lengths[:, None]
  tokens = np.where(kept, tokens, pad).astype(np.int32)
  texts = [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(tokens, lengths)]
  gen = Generation(tokens, lengths, done | stopped, texts, seconds, np.where(kept, logps, 0.0).astype(np.float32))
  if b is None:
    return gen
  return dataclasses.replace(gen, thinking_tokens=np.minimum(b.thinking, lengths), forced_closes=b.forced,
                             extensions=b.extensions, unclosed=~b.closed | (b.head < b.qlen),
                             loop_closes=b.looped)


def generate(
    params,
    cfg: ModelConfig,
    tokenizer,
    prompt_tokens_BxP: np.ndarray,
    prompt_mask_BxP: np.ndarray,
    *,
    eos_ids: tuple[int, ...],
    pad_id: int,
    sampling: SamplingCfg,
    key: jax.Array | None = None,
    lora=None,
    lora_scale: float = 1.0,
    group: int = 1,
    stop_strings: tuple[str, ...] = (),
    chunk: int = 64,
    on_chunk: Callable[[np.ndarray, np.ndarray], None] | None = None,
    dtype=jnp.float32,
    budget: BudgetCfg | None = None,
    schema: TagSchema | None = None,
) -> Generation:
  """Generate up to `sampling.max_new_tokens` tokens for each prompt, `group` times.

  The prompts end inside the reasoning block (the schema's primer). With `schema` the
  result also reports each row's thinking; `budget` then caps or extends it (s1).
  `on_chunk(tokens_BxN, lengths_B)` sees each row's tokens only grow: the start of a close
  tag that may yet be suppressed is held back until it is settled. `pad_id` fills each row's
  tokens after its end: callers with a model pass `model.pad_id` (the one pad rule).
  """
  t0 = time.perf_counter()
  forcing = _forcing(tokenizer, schema, budget)
  key = jax.random.key(sampling.seed) if key is None else key
  eos = jnp.asarray(eos_ids, jnp.int32)
  pad = int(pad_id)
  prefix, first, next_pos = prefill(params, lora, lora_scale, jnp.asarray(prompt_tokens_BxP),
                                    jnp.asarray(prompt_mask_BxP, bool), cfg=cfg, dtype=dtype)
  prefix = KVCache(prefix.k, prefix.v, prefix.valid, prefix.pos, group)
  max_new, mode = sampling.max_new_tokens, sampling_mode(sampling)
  slots = max_new + (forcing.rewind * budget.extend if forcing is not None and budget else 0)
  state = start(prefix, first, next_pos, key, forcing, cfg=cfg, group=group, max_new=max_new, mode=mode,
                eos_ids=eos, pad_id=pad, slots=slots, dtype=dtype)
  stop_len = np.zeros(state.done.shape, np.int64)
  step = 1
  while True:
    if stop_strings or on_chunk is not None:
      state = _check_stops(tokenizer, state, forcing, stop_strings, stop_len, on_chunk)
    if step >= slots or not bool(jnp.any(alive(state))):
      break
    span = _span(step, slots)
    step = min(step + chunk, span)
    state = decode(params, lora, lora_scale, prefix, state, step, eos, pad, forcing, cfg=cfg, mode=mode,
                   span=span, dtype=dtype)
  return _result(tokenizer, state, stop_len, pad, t0)


def left_pad(ids_list: list[list[int]], length: int | None, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to a fixed length: (tokens_BxP, mask_BxP)."""
  length = length or max(len(x) for x in ids_list)
  for i, ids in enumerate(ids_list):
    if len(ids) > length:
      raise ValueError(f"prompt {i} has {len(ids)} tokens > {length}")
  rows = [left_pad_row(ids, length, pad_id) for ids in ids_list]
  return np.stack([t for t, _ in rows]), np.stack([m for _, m in rows])
