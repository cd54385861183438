"""Sampler: greedy equals teacher-forced argmax, EOS / stop strings, seeds, no recompiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpu_reason import mesh, models, sharding as sharding_lib
from tpu_reason.config import MeshCfg, SamplingCfg
from tpu_reason.models import transformer as T
from tpu_reason.sampling import sampler

TINY = T.ModelConfig(family="llama", vocab_size=97, embed_dim=32, hidden_dim=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)


class ByteTok:
  """Minimal tokenizer: id i <-> chr(32 + i % 95); enough for stop-string logic (no pad: callers pass pad_id)."""

  def decode(self, ids, skip_special_tokens=False):
    return "".join(chr(32 + int(i) % 95) for i in ids)


@pytest.fixture(scope="module")
def tiny():
  return T.init_params(TINY, jax.random.key(0))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _argmax_each_position(params, cfg, ids_1xT):
  return jnp.argmax(T.logits(params, cfg, T.forward(params, cfg, ids_1xT, jnp.arange(ids_1xT.shape[1])[None]))[0], -1)


def _greedy_reference(params, cfg, prompt, n):
  """Greedy decoding by re-running the full forward on the growing sequence. The sequence is right-padded to
  its final length, so one program serves every step: causal attention never lets a position see the pad."""
  seq = np.zeros((1, len(prompt) + n), np.int32)
  seq[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    seq[0, t] = int(_argmax_each_position(params, cfg, jnp.asarray(seq))[t - 1])
  return seq[0, len(prompt):].tolist()


@pytest.mark.slow
def test_greedy_matches_full_forward_with_left_padding(tiny):
  prompts = [[5, 6, 7, 8, 9], [11, 12]]
  tokens, mask = sampler.left_pad(prompts, 8, 0)
  gen = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                         sampling=SamplingCfg(max_new_tokens=12), chunk=5)
  for i, p in enumerate(prompts):
    assert gen.tokens[i].tolist() == _greedy_reference(tiny, TINY, p, 12)
  assert gen.lengths.tolist() == [12, 12] and not gen.finished.any()


def _teacher_forced_argmax(params, cfg, prompt, completion):
  """Argmax of one full forward over prompt + completion, at the positions that predicted it."""
  seq = jnp.array([list(prompt) + list(completion)])
  h = T.forward(params, cfg, seq, jnp.arange(seq.shape[1])[None])
  return np.asarray(jnp.argmax(T.logits(params, cfg, h)[0], -1))[len(prompt) - 1:-1]


@pytest.mark.slow
def test_greedy_across_span_buckets_matches_teacher_forcing(tiny):
  """80 steps cross the 64-slot attention span bucket; the cache must stay exact across it."""
  prompts = [[5, 6, 7, 8, 9], [11, 12]]
  tokens, mask = sampler.left_pad(prompts, 8, 0)
  gen = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                         sampling=SamplingCfg(max_new_tokens=80), chunk=24)
  assert gen.lengths.tolist() == [80, 80]
  for i, p in enumerate(prompts):
    np.testing.assert_array_equal(gen.tokens[i], _teacher_forced_argmax(tiny, TINY, p, gen.tokens[i]))


@pytest.mark.slow
def test_sharded_generate_matches_single_device(tiny):
  """Params split over a 2x4 mesh of fake devices: the same greedy tokens as on one device."""
  m = mesh.make_mesh(MeshCfg(fsdp=2, tp=4))
  placed = sharding_lib.place(tiny, sharding_lib.shardings(T.param_shapes(TINY), m))
  assert len(placed["layers"]["gate"].sharding.device_set) == 8
  tokens, mask = sampler.left_pad([[5, 6, 7], [8, 9], [1, 2, 3], [4]], 4, 0)
  s = SamplingCfg(max_new_tokens=10)
  one = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0, sampling=s, group=2)
  many = sampler.generate(placed, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0, sampling=s, group=2)
  np.testing.assert_array_equal(one.tokens, many.tokens)


@pytest.mark.slow
def test_rollout_rows_are_split_over_the_mesh(tiny):
  """Under the mesh each chip decodes its own rows: its KV caches hold only those, and the
  sampled tokens (greedy and at T=1) are the ones a single device draws."""
  m = mesh.make_mesh(MeshCfg(fsdp=4, tp=2))
  placed = sharding_lib.place(tiny, sharding_lib.shardings(T.param_shapes(TINY), m))
  tokens, mask = sampler.left_pad([[5, 6, 7], [8, 9], [1, 2, 3], [4]], 4, 0)
  for s in (SamplingCfg(max_new_tokens=10), SamplingCfg(max_new_tokens=10, temperature=1.0, top_k=0)):
    one = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0, sampling=s, group=2)
    with jax.set_mesh(m):
      many = sampler.generate(placed, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0, sampling=s, group=2)
    np.testing.assert_array_equal(one.tokens, many.tokens)
  with jax.set_mesh(m):
    prefix, first, next_pos = sampler.prefill(placed, None, 1.0, jnp.asarray(tokens), jnp.asarray(mask), cfg=TINY)
    shared = T.KVCache(prefix.k, prefix.v, prefix.valid, prefix.pos, group=2)
    state = sampler.start(shared, first, next_pos, jax.random.key(0), cfg=TINY, group=2, max_new=10,
                          mode=(0.0, 0, 1.0), eos_ids=jnp.asarray([-1]), pad_id=0)
  kv_per_chip = TINY.num_kv_heads // 2 if TINY.num_kv_heads % 2 == 0 else TINY.num_kv_heads
  # [L, rows, K, H, S]: 4 prompts -> 1 per chip, 4 x G=2 rows -> 2 per chip
  assert {sh.data.shape[1:3] for sh in prefix.k.addressable_shards} == {(1, kv_per_chip)}
  assert {sh.data.shape[1:3] for sh in state.suffix.k.addressable_shards} == {(2, kv_per_chip)}
  assert {sh.data.shape for sh in state.tokens.addressable_shards} == {(2, 10)}


@pytest.mark.slow
def test_group_samples_share_prompt_but_differ(tiny):
  tokens, mask = sampler.left_pad([[5, 6, 7], [8, 9]], 4, 0)
  s = SamplingCfg(max_new_tokens=16, temperature=1.0)
  gen = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0, sampling=s, group=4)
  assert gen.tokens.shape == (8, 16)
  assert len({tuple(r) for r in gen.tokens[:4].tolist()}) > 1  # G samples are not identical
  # greedy with a group gives G copies of the single greedy sample
  g1 = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                        sampling=SamplingCfg(max_new_tokens=8), group=3)
  g0 = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                        sampling=SamplingCfg(max_new_tokens=8))
  np.testing.assert_array_equal(g1.tokens, np.repeat(g0.tokens, 3, axis=0))


@pytest.mark.slow
def test_seed_controls_sampling(tiny):
  tokens, mask = sampler.left_pad([[5, 6, 7]], 4, 0)
  run = lambda seed: sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,  # noqa: E731
                                      sampling=SamplingCfg(max_new_tokens=24, temperature=1.0, seed=seed)).tokens
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))
  key_a = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0, key=jax.random.key(7),
                           sampling=SamplingCfg(max_new_tokens=24, temperature=1.0)).tokens
  assert not np.array_equal(key_a, run(0))  # an explicit key overrides the config seed


@pytest.mark.slow
def test_eos_stops_row_and_pads(tiny):
  tokens, mask = sampler.left_pad([[5, 6, 7, 8, 9]], 8, 0)
  free = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                          sampling=SamplingCfg(max_new_tokens=10))
  eos = int(free.tokens[0, 3])
  first = int(np.argmax(free.tokens[0] == eos))  # the EOS may occur earlier than index 3
  gen = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(eos, 96),
                         sampling=SamplingCfg(max_new_tokens=10),
                         pad_id=3)
  assert gen.finished[0] and gen.lengths[0] == first + 1
  assert gen.tokens[0, first] == eos and (gen.tokens[0, first + 1:] == 3).all()  # the caller's pad id


def test_stop_string_cuts_at_the_token_that_completes_it(tiny):
  tokens, mask = sampler.left_pad([[5, 6, 7, 8, 9]], 8, 0)
  free = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                          sampling=SamplingCfg(max_new_tokens=20))
  text = ByteTok().decode(free.tokens[0])
  stop = text[6:8]
  gen = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                         sampling=SamplingCfg(max_new_tokens=20),
                         stop_strings=(stop,), chunk=4)
  n = text.index(stop) + len(stop)
  assert gen.finished[0] and gen.lengths[0] == n and gen.texts[0] == text[:n]


@pytest.mark.slow
def test_top_k_one_is_greedy(tiny):
  tokens, mask = sampler.left_pad([[5, 6, 7]], 4, 0)
  greedy = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                            sampling=SamplingCfg(max_new_tokens=10))
  topk = sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0,
                          sampling=SamplingCfg(max_new_tokens=10, temperature=1.5, top_k=1, seed=3))
  np.testing.assert_array_equal(greedy.tokens, topk.tokens)


def test_top_k_samples_the_k_best_in_proportion():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.3, 0.2], [0.6, 0.1, 0.25, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draws = np.asarray(jax.vmap(lambda k: sampler.sample_token(logits, k, 1.0, 2, 1.0))(keys))
  for row, (best, second) in enumerate([(1, 2), (0, 2)]):
    assert set(np.unique(draws[:, row]).tolist()) == {best, second}
    p = np.exp(logits[row, best]) / (np.exp(logits[row, best]) + np.exp(logits[row, second]))
    assert abs(float((draws[:, row] == best).mean()) - p) < 0.05


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draws = jax.vmap(lambda k: sampler.sample_token(logits, k, 1.0, 0, 0.75))(keys)[:, 0]
  assert set(np.unique(draws).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75; the tail is cut
  frac0 = float((draws == 0).mean())
  assert abs(frac0 - 0.5 / 0.8) < 0.05


@pytest.mark.slow
def test_no_recompile_across_calls(tiny):
  tokens, mask = sampler.left_pad([[5, 6, 7], [1, 2]], 4, 0)
  s = SamplingCfg(max_new_tokens=12, temperature=1.0)
  sampler.generate(tiny, TINY, ByteTok(), tokens, mask, eos_ids=(-1,), pad_id=0, sampling=s, chunk=4)
  sizes = (sampler.prefill._cache_size(), sampler.start._cache_size(), sampler.decode._cache_size())
  for seed in range(3):
    other, omask = sampler.left_pad([[9, 9, 9, 9], [3]], 4, 0)
    sampler.generate(tiny, TINY, ByteTok(), other, omask, eos_ids=(-1,), pad_id=0, chunk=4,
                     sampling=SamplingCfg(max_new_tokens=12, temperature=1.0, seed=seed), key=jax.random.key(seed))
  assert (sampler.prefill._cache_size(), sampler.start._cache_size(), sampler.decode._cache_size()) == sizes


@pytest.mark.slow
def test_real_model_answers_coherently(smollm2):
  m = smollm2
  params = jax.tree.map(jnp.asarray, m.params)
  tokens, mask = sampler.left_pad([m.encode(m.chat_prompt("What is the capital of France?"))], None, 0)
  gen = sampler.generate(params, m.cfg, m.tokenizer, tokens, mask, eos_ids=m.eos_ids, pad_id=m.pad_id,
                         sampling=SamplingCfg(max_new_tokens=24))
  assert "Paris" in gen.texts[0]
  assert gen.finished[0]  # the instruct model ends its turn with <|im_end|>


@pytest.mark.parametrize("n, cap, want", [(1, 512, 64), (64, 512, 64), (65, 512, 128), (300, 512, 512),
                                          (300, 192, 192), (10, 40, 40), (5, 512, 64), (700, None, 1024)])
def test_pow2_bucket(n, cap, want):
  assert sampler.pow2_bucket(n, cap) == want


def test_prompt_width_is_a_power_of_two_from_64_that_keeps_every_token():
  assert [sampler.prompt_width(n) for n in (1, 64, 65, 129, 1000)] == [64, 64, 128, 256, 1024]
  assert sampler.prompt_width(50, cap=56) == 56 and sampler.prompt_width(100, cap=96) == 96
  assert len({sampler.prompt_width(n) for n in range(1, 2049)}) == 6  # few compiled shapes


def test_model_pad_and_end_of_turn_ids():
  m = models.load("tiny-llama")
  im_end = m.tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert m.end_of_turn_id == im_end
  want = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else im_end
  assert m.pad_id == want
