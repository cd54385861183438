"""Budget forcing (s1): the thinking cap and the Wait extension change the token stream
exactly as specified, through the cached decode (no re-prefill)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpu_reason import models
from tpu_reason.config import BudgetCfg, SamplingCfg
from tpu_reason.models import transformer as T
from tpu_reason.sampling import sampler
from tpu_reason.tags import SCHEMAS, TagSchema

TINY = T.ModelConfig(family="llama", vocab_size=97, embed_dim=32, hidden_dim=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)

# The tiny random model below repeats "C" a lot after prompts 1 and 2 and never writes "CC"
# after prompt 0, so "CC" makes a close tag it emits naturally (and one row it never closes).
CC = TagSchema(name="cc", reasoning_open="<t>", reasoning_close="CC", answer_open=None, answer_close=None,
               primer="", stop_strings=(), answer_prefix="A:")
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [40, 41, 42]]


class CharTok:
  """One token per character: id i <-> chr(32 + i) for printable ASCII, 95 <-> newline."""

  pad_token_id = 0

  def encode(self, text, add_special_tokens=False):
    return [95 if c == "\n" else ord(c) - 32 for c in text]

  def decode(self, ids, skip_special_tokens=False):
    return "".join("\n" if i == 95 else chr(32 + int(i) % 95) for i in ids)


@pytest.fixture(scope="module")
def tiny():
  return T.init_params(TINY, jax.random.key(0))


def _generate(params, cfg, tok, prompts, max_new, budget=None, schema=CC, eos_ids=(-1,)):
  tokens, mask = sampler.left_pad(prompts, None, 0)
  return sampler.generate(params, cfg, tok, tokens, mask, eos_ids=eos_ids, pad_id=0, chunk=16, budget=budget,
                          schema=schema, sampling=SamplingCfg(max_new_tokens=max_new))


@functools.partial(jax.jit, static_argnames="cfg")
def _full_logits(params, ids_1xT, cfg):
  return T.logits(params, cfg, T.forward(params, cfg, ids_1xT, jnp.arange(ids_1xT.shape[1])[None]))[0]


def _reference(params, cfg, prompt, max_new, close, wait, force, budget, eos_ids=()):
  """Greedy budget forcing as specified, with a cache-free forward for every sampled token."""
  total = len(prompt) + max_new
  cap, n = budget.max_thinking_tokens, len(close)
  out, queue, closed, stats = [], [], False, {"thinking": None, "forced": 0, "extensions": 0}
  while len(out) < max_new and not (out and out[-1] in eos_ids):
    if queue:
      tok = queue.pop(0)
    else:
      ids = np.zeros((1, total), np.int32)
      ids[0, :len(prompt) + len(out)] = prompt + out
      tok = int(np.argmax(_full_logits(params, ids, cfg)[len(prompt) + len(out) - 1]))
      if not closed and len(out) >= n - 1 and out[len(out) - n + 1:] + [tok] == close:
        start = len(out) - n + 1
        if stats["extensions"] < budget.extend and (cap == 0 or start < cap):
          out, tok, queue = out[:start], wait[0], list(wait[1:])
          stats["extensions"] += 1
        else:
          closed, stats["thinking"] = True, start
    out.append(tok)
    if not closed and not queue and cap and len(out) >= cap:
      queue, closed, stats["thinking"], stats["forced"] = list(force), True, len(out), 1
  stats["thinking"] = len(out) if stats["thinking"] is None else stats["thinking"]
  return out, stats


def _assert_matches_reference(gen, params, cfg, tok, prompts, schema, budget, eos_ids=()):
  for i, p in enumerate(prompts):
    close = tok.encode(schema.reasoning_close)
    want, stats = _reference(params, cfg, p, gen.tokens.shape[1], close, tok.encode(budget.wait),
                             tok.encode(schema.answer_start), budget, eos_ids)
    assert gen.tokens[i, :gen.lengths[i]].tolist() == want, f"row {i}"
    got = {"thinking": gen.thinking_tokens[i], "forced": gen.forced_closes[i], "extensions": gen.extensions[i]}
    assert got == stats, f"row {i}"


@pytest.mark.parametrize("budget", [
    BudgetCfg(max_thinking_tokens=5),
    BudgetCfg(extend=2),
    BudgetCfg(max_thinking_tokens=14, extend=3),
    BudgetCfg(extend=2, wait="CC"),  # forced tokens that spell the close never count as one
], ids=["cap", "extend", "cap+extend", "wait-contains-close"])
@pytest.mark.slow
def test_tiny_matches_the_reference(tiny, budget):
  gen = _generate(tiny, TINY, CharTok(), PROMPTS, 40, budget)
  _assert_matches_reference(gen, tiny, TINY, CharTok(), PROMPTS, CC, budget)


@pytest.mark.slow
def test_cap_forces_the_answer_start_exactly_at_the_cap(tiny):
  free = _generate(tiny, TINY, CharTok(), PROMPTS, 30)
  assert free.thinking_tokens.tolist() == [30, 3, 1]
  gen = _generate(tiny, TINY, CharTok(), PROMPTS, 30, BudgetCfg(max_thinking_tokens=3))
  force = CharTok().encode(CC.answer_start)
  for i in (0, 1):  # still thinking at the cap
    np.testing.assert_array_equal(gen.tokens[i, :3], free.tokens[i, :3])
    assert gen.tokens[i, 3:3 + len(force)].tolist() == force
  np.testing.assert_array_equal(gen.tokens[2], free.tokens[2])  # closed before the cap: untouched
  assert gen.thinking_tokens.tolist() == [3, 3, 1] and gen.forced_closes.tolist() == [1, 1, 0]
  assert not gen.unclosed.any() and gen.extensions.tolist() == [0, 0, 0]


@pytest.mark.slow
def test_wait_replaces_each_close_and_other_rows_stay_bit_identical(tiny):
  free = _generate(tiny, TINY, CharTok(), PROMPTS, 40)
  assert free.unclosed.tolist() == [True, False, False]
  gen = _generate(tiny, TINY, CharTok(), PROMPTS, 40, BudgetCfg(extend=2, wait="So"))
  np.testing.assert_array_equal(gen.tokens[0], free.tokens[0])  # row 0 never closes: untouched
  assert gen.extensions.tolist() == [0, 2, 2] and gen.unclosed.tolist() == [True, False, False]
  for i in (1, 2):
    c = free.thinking_tokens[i]  # the close's first token, replaced by the wait string
    np.testing.assert_array_equal(gen.tokens[i, :c], free.tokens[i, :c])
    assert gen.texts[i][c:c + 2] == "So"
    # two closes became "So"; the third one stands and ends the thinking
    thinking = gen.texts[i][:gen.thinking_tokens[i]]
    assert thinking.count("So") == 2 and "CC" not in thinking
    assert gen.texts[i][gen.thinking_tokens[i]:].startswith("CC")


def test_streamed_text_only_grows(tiny):
  """on_chunk never shows a close's first token that a suppression then takes back."""
  seen = []
  tokens, mask = sampler.left_pad(PROMPTS, None, 0)
  gen = sampler.generate(tiny, TINY, CharTok(), tokens, mask, eos_ids=(-1,), pad_id=0, chunk=1,
                         budget=BudgetCfg(extend=2, wait="So"),
                         schema=CC, sampling=SamplingCfg(max_new_tokens=30),
                         on_chunk=lambda t, n: seen.append([CharTok().decode(r[:k]) for r, k in zip(t, n)]))
  assert gen.extensions.tolist() == [0, 2, 2]
  for before, after in zip(seen, seen[1:] + [gen.texts]):
    assert all(a.startswith(b) for b, a in zip(before, after))


@pytest.mark.slow
def test_zero_budget_changes_nothing(tiny):
  plain = _generate(tiny, TINY, CharTok(), PROMPTS, 24, schema=None)
  assert plain.thinking_tokens is None
  for budget in (None, BudgetCfg()):
    tracked = _generate(tiny, TINY, CharTok(), PROMPTS, 24, budget)
    np.testing.assert_array_equal(tracked.tokens, plain.tokens)
    assert tracked.forced_closes.sum() == tracked.extensions.sum() == 0
  # the close is tracked even without forcing: "CC" starts where the free text first has it
  texts = [CharTok().decode(t) for t in plain.tokens]
  assert tracked.thinking_tokens.tolist() == [t.find("CC") if "CC" in t else 24 for t in texts]


def test_forcing_reuses_the_prefix_cache(tiny, monkeypatch):
  calls = []
  prefill = sampler.prefill
  monkeypatch.setattr(sampler, "prefill", lambda *a, **k: calls.append(1) or prefill(*a, **k))
  gen = _generate(tiny, TINY, CharTok(), PROMPTS, 40, BudgetCfg(max_thinking_tokens=20, extend=2))
  assert gen.extensions.sum() >= 2 and gen.forced_closes.sum() >= 1
  assert len(calls) == 1  # forced tokens go through the cached decode


def test_budget_needs_a_schema(tiny):
  with pytest.raises(ValueError, match="schema"):
    _generate(tiny, TINY, CharTok(), PROMPTS, 8, BudgetCfg(extend=1), schema=None)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.slow
def test_cap_for_every_schema(tiny, name):
  schema = SCHEMAS[name]
  gen = _generate(tiny, TINY, CharTok(), PROMPTS, 40, BudgetCfg(max_thinking_tokens=4), schema=schema)
  force = CharTok().encode(schema.answer_start)
  assert all(gen.tokens[i, 4:4 + len(force)].tolist() == force for i in range(len(PROMPTS)))
  assert all(schema.parse(schema.primer + t).closed_reasoning for t in gen.texts)


@pytest.fixture(scope="module")
def smollm2():
  m = models.load("smollm2-135m")
  return m, jax.tree.map(jnp.asarray, m.params)


@pytest.mark.slow
def test_real_model_wait_then_cap(smollm2):
  """SmolLM2 copies a one-shot format and closes its reasoning after 8 tokens; with extend=1
  that close becomes "Wait", the model reasons on, and the cap closes it at 16 tokens."""
  m, params = smollm2
  schema = SCHEMAS["reasoning"]
  shot = f"Answer in this format.\nQuestion: What is 2 + 3?\n{schema.render_target('2 + 3 = 5', '5')}\n"
  prompt = [m.encode(m.chat_prompt(shot + "Question: What is 4 + 4?", primer=schema.primer))]
  budget = BudgetCfg(max_thinking_tokens=16, extend=1)
  free = _generate(params, m.cfg, m.tokenizer, prompt, 40, schema=schema, eos_ids=m.eos_ids)
  gen = _generate(params, m.cfg, m.tokenizer, prompt, 40, budget, schema=schema, eos_ids=m.eos_ids)
  c = free.thinking_tokens[0]
  assert c < 16 and not free.unclosed[0]
  np.testing.assert_array_equal(gen.tokens[0, :c], free.tokens[0, :c])
  assert gen.texts[0].startswith(free.texts[0][:free.texts[0].index(schema.reasoning_close)] + "Wait")
  force = m.tokenizer.encode(schema.answer_start, add_special_tokens=False)
  assert gen.tokens[0, 16:16 + len(force)].tolist() == force
  assert (gen.extensions[0], gen.forced_closes[0], gen.thinking_tokens[0]) == (1, 1, 16)
  assert schema.parse(schema.primer + gen.texts[0]).answer is not None
  _assert_matches_reference(gen, params, m.cfg, m.tokenizer, prompt, schema, budget, m.eos_ids)


def _guard_reference(params, cfg, prompt, max_new, close, force, guard: BudgetCfg):
  """Greedy decoding with the repetition guard as specified, cache-free: (tokens, looped)."""
  n, times, w = guard.repeat_ngram, guard.repeat_times, guard.repeat_window
  out, queue, closed, looped = [], [], False, 0
  while len(out) < max_new:
    if queue:
      tok = queue.pop(0)
    else:
      ids = np.zeros((1, len(prompt) + max_new), np.int32)
      ids[0, :len(prompt) + len(out)] = prompt + out
      tok = int(np.argmax(_full_logits(params, ids, cfg)[len(prompt) + len(out) - 1]))
      closed |= len(out) >= len(close) - 1 and out[len(out) - len(close) + 1:] + [tok] == close
    out.append(tok)
    if not closed and not queue and len(out) >= n:
      earlier = range(max(0, len(out) - w), len(out) - n)
      if sum(out[s:s + n] == out[-n:] for s in earlier) >= times - 1:
        queue, closed, looped = list(force), True, 1
  return out, looped


@pytest.mark.parametrize("guard", [BudgetCfg(repeat_ngram=2, repeat_times=3, repeat_window=12),
                                   BudgetCfg(repeat_ngram=3, repeat_times=2, repeat_window=256)],
                         ids=["2x3-in-12", "3x2-in-256"])
@pytest.mark.slow
def test_repetition_guard_closes_a_loop_and_leaves_the_rest(tiny, guard):
  free = _generate(tiny, TINY, CharTok(), PROMPTS, 40)
  assert free.unclosed.tolist() == [True, False, False]  # row 0 loops on to the cap
  gen = _generate(tiny, TINY, CharTok(), PROMPTS, 40, guard)
  force = CharTok().encode(CC.answer_start)
  for i, p in enumerate(PROMPTS):
    want, looped = _guard_reference(tiny, TINY, p, 40, CharTok().encode(CC.reasoning_close), force, guard)
    assert gen.tokens[i, :gen.lengths[i]].tolist() == want, f"row {i}"
    assert gen.loop_closes[i] == looped, f"row {i}"
  assert gen.loop_closes.tolist() == [1, 0, 0] and not gen.unclosed.any()
  t = gen.thinking_tokens[0]
  np.testing.assert_array_equal(gen.tokens[0, :t], free.tokens[0, :t])  # the loop, up to the guard
  assert gen.tokens[0, t:t + len(force)].tolist() == force
  np.testing.assert_array_equal(gen.tokens[1:], free.tokens[1:])  # rows that close by themselves: untouched
  assert gen.forced_closes.sum() == gen.extensions.sum() == 0


def test_repetition_guard_config():
  with pytest.raises(ValueError, match="repeat_window"):
    BudgetCfg(repeat_ngram=8, repeat_times=4, repeat_window=16)
  from tpu_reason.sampling import budget as budget_lib
  assert budget_lib.label(BudgetCfg(repeat_ngram=4)) == "+guard"
  assert budget_lib.label(BudgetCfg(max_thinking_tokens=8, repeat_ngram=4)) == "+budget+guard"
