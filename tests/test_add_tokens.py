"""Tokenizer surgery as a feature (`model.add_tokens`): config, ids and decoding, the token deltas in the
forward / head / merge, and a tiny-llama SFT run that trains the rows, resumes exactly and exports.

The SFT tests reuse test_sft's helpers: one `sft.build` for the module (its step compiles once), the
runs swapped onto it by `reuse_build`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import TINY_GEMMA3, TINY_LLAMA, tiny_params
from tests.test_sft import host, interrupt_training_after, make_cfg, restore_last, reuse_build, write_rows
from tpu_reason import config, config_io, export, lora as lora_lib, losses, models, policy, runs, sft, tags
from tpu_reason.config import Config
from tpu_reason.data.batch import Batch
from tpu_reason.errors import UserError
from tpu_reason.models.transformer import forward, logits, positions
from tpu_reason.tree import flatten, unflatten

pytestmark = pytest.mark.slow  # whole trainer runs with added tokens

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
ADD = "model.add_tokens=[" + ",".join(f'"{t}"' for t in TAGS) + "]"


@pytest.fixture(scope="module")
def grown():
  """tiny-llama as a run with `model.add_tokens` computes with (and the plain model)."""
  section = config_io.load(Config, None, ["model.spec=tiny-llama", ADD]).model
  return models.load_for(section), models.load("tiny-llama")


# --------------------------------------------------------------------------- config, ids, text


def test_config_reads_lists_and_rejects_empty_or_repeated_tokens():
  assert config_io.load(Config, None, [ADD]).model.add_tokens == TAGS
  assert config_io.load(Config, None, ["model.add_tokens=<a>,<b>"]).model.add_tokens == ("<a>", "<b>")
  with pytest.raises(UserError, match="empty strings"):
    config_io.load(Config, None, ['model.add_tokens=["<a>",""]'])
  with pytest.raises(UserError, match="'<a>' more than once"):
    config_io.load(Config, None, ["model.add_tokens=[<a>,<b>,<a>]"])


def test_tags_encode_to_the_new_ids_and_decode_back_to_their_text(grown):
  model, base = grown
  v = base.cfg.vocab_size
  assert model.cfg.new_tokens == tuple(range(v, v + 4)) and model.cfg.vocab_size == v + 4
  schema = tags.get_schema("reasoning")
  text = schema.render_target("3 + 4 = 7.", "7")
  ids = model.tokenizer.encode(text, add_special_tokens=False)
  assert [i for i in ids if i >= v] == list(model.cfg.new_tokens)  # one id per tag, in order
  assert len(ids) < len(base.tokenizer.encode(text, add_special_tokens=False))
  # the sampler decodes with skip_special_tokens=True: the tags are normal added tokens, so their text stays
  decoded = model.tokenizer.decode(ids + [model.eos_ids[0]], skip_special_tokens=True)
  assert decoded == text and schema.parse(decoded).well_formed
  # the surgery grew only new rows, at the mean; the old ones are the base's
  embed = model.params["embed"]
  np.testing.assert_array_equal(embed[:v], base.params["embed"])
  np.testing.assert_array_equal(embed[v:], np.repeat(base.params["embed"].mean(0, keepdims=True), 4, 0))


def test_ids_inside_a_padded_vocabulary_do_not_grow_it(grown):
  _, base = grown
  n = len(base.tokenizer)
  cfg = dataclasses.replace(base.cfg, vocab_size=n + 8, tie_embeddings=False)  # Qwen-style padding, untied
  rng = np.random.default_rng(0)  # only the vocabulary matrices matter to the surgery
  params = {"embed": rng.standard_normal((n + 8, cfg.embed_dim)).astype(np.float32),
            "lm_head": rng.standard_normal((cfg.embed_dim, n + 8)).astype(np.float32)}
  padded = dataclasses.replace(base, cfg=cfg, params=params)
  out = models.add_tokens(padded, ["<answer>", "</answer>"])
  assert out.cfg.vocab_size == n + 8 and out.cfg.new_tokens == (n, n + 1)
  assert out.params["embed"].shape == padded.params["embed"].shape
  for name, axis in (("embed", 0), ("lm_head", 1)):
    old, new = np.moveaxis(padded.params[name], axis, 0), np.moveaxis(out.params[name], axis, 0)
    np.testing.assert_array_equal(new[:n], old[:n])
    np.testing.assert_array_equal(new[n + 2:], old[n + 2:])  # the padding rows nobody uses stay
    np.testing.assert_allclose(new[n: n + 2], np.repeat(old[:n].mean(0, keepdims=True), 2, 0), rtol=1e-6)


# --------------------------------------------------------------------------- forward, head, merge

CASES = {"tied": TINY_LLAMA, "untied": dataclasses.replace(TINY_LLAMA, tie_embeddings=False), "gemma3": TINY_GEMMA3}


@pytest.mark.parametrize("case", sorted(CASES))
def test_token_deltas_in_forward_and_head_equal_the_merge(case):
  cfg = dataclasses.replace(CASES[case], new_tokens=(3, 70, 127))
  lcfg = config.LoraCfg(rank=4, alpha=8.0)
  table = lora_lib.shapes(cfg, lcfg)
  assert table["tokens/embed"] == ((3, cfg.embed_dim), ("lora", "embed"))
  assert ("tokens/head" in table) == (not cfg.tie_embeddings)
  params = tiny_params(cfg)
  fresh = lora_lib.init(cfg, lcfg, jax.random.key(0))
  assert all(not np.any(x) for n, x in flatten(fresh).items() if n.startswith("tokens/"))
  rng = np.random.default_rng(1)
  lora = unflatten({n: x if n.endswith("/a") else jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32)
                    for n, x in flatten(fresh).items()})
  tokens = jnp.array([[1, 3, 5, 70, 9, 127, 3, 2], [127, 4, 70, 70, 8, 3, 11, 0]])
  pos = positions(jnp.ones(tokens.shape, bool))

  def run(p, adapters):
    return np.asarray(logits(p, cfg, forward(p, cfg, tokens, pos, lora=adapters, lora_scale=2.0), adapters))

  merged = lora_lib.merge(params, lora, 2.0, cfg.new_tokens)
  adapted = run(params, lora)
  plain = dataclasses.replace(cfg, new_tokens=())  # the merged model: the trained rows are in its weights
  np.testing.assert_allclose(adapted, np.asarray(logits(merged, plain, forward(merged, plain, tokens, pos))),
                             atol=2e-5)
  # the token deltas matter, and only the new ids' rows / columns moved in the merge
  no_tokens = run(params, {"layers": lora["layers"]})
  assert np.abs(adapted - no_tokens).max() > 1e-2
  other = np.setdiff1d(np.arange(cfg.vocab_size), cfg.new_tokens)
  np.testing.assert_array_equal(np.asarray(merged["embed"])[other], np.asarray(params["embed"])[other])
  if not cfg.tie_embeddings:
    np.testing.assert_array_equal(np.asarray(merged["lm_head"])[:, other], np.asarray(params["lm_head"])[:, other])
  # the losses read the same head
  batch = Batch(prompt_tokens_BxP=tokens[:, :4], prompt_mask_BxP=jnp.ones((2, 4), bool),
                completion_tokens_BxC=tokens[:, 4:], completion_mask_BxC=jnp.ones((2, 4), bool))
  logp = losses.completion_logprobs(params, cfg, batch, lora=lora, lora_scale=2.0, chunk=48)
  want = np.take_along_axis(np.asarray(jax.nn.log_softmax(adapted[:, 3:7], -1)), np.asarray(tokens[:, 4:, None]), -1)
  np.testing.assert_allclose(np.asarray(logp), want[..., 0], atol=2e-5)
  with pytest.raises(UserError, match="model.add_tokens must match"):
    lora_lib.merge(params, lora, 2.0, cfg.new_tokens[:2])


# --------------------------------------------------------------------------- an SFT run with added tokens


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  """`sft.build` of tiny-llama with the tags added (one completion bucket: one compile of the step)."""
  data = write_rows(tmp_path_factory.mktemp("data") / "rows.jsonl", 16, 0, 4)
  tr = sft.build(make_cfg(tmp_path_factory.mktemp("trainer"), data, ADD, "train.optim.lr=1e-2"))
  assert len(tr.model.cfg.new_tokens) == 4
  return tr


@pytest.fixture(scope="module")
def straight_run(trainer, tmp_path_factory):
  """4 steps in one go, generating two held-out completions before and after (the sampler reads the rows)."""
  out = tmp_path_factory.mktemp("straight") / "run"
  cfg = dataclasses.replace(trainer.cfg, output_dir=str(out),
                            train=dataclasses.replace(trainer.cfg.train, eval_generate=2))
  with pytest.MonkeyPatch.context() as mp:
    reuse_build(mp, trainer)
    sft.run(cfg)
  return cfg, out


def test_sft_trains_the_new_rows_and_leaves_the_old_ones(trainer, straight_run, grown):
  _, out = straight_run
  surgery, base = grown
  lora, scale, _ = runs.load_lora(out, "last")
  assert lora["tokens"]["embed"].shape == (4, surgery.cfg.embed_dim) and "head" not in lora["tokens"]
  merged = np.asarray(lora_lib.merge(surgery.params, lora, scale, surgery.cfg.new_tokens)["embed"])
  ids, v = list(surgery.cfg.new_tokens), base.cfg.vocab_size
  np.testing.assert_array_equal(merged[:v], base.params["embed"])  # every old row bit for bit
  moved = np.abs(merged[ids] - surgery.params["embed"][ids]).max(axis=1)
  assert np.all(moved > 1e-3), moved  # each tag's row trained (all four occur in every example)


def test_interrupted_run_with_added_tokens_resumes_exactly(trainer, straight_run, tmp_path, monkeypatch):
  cfg_a, out_a = straight_run
  out = tmp_path / "run"
  cfg = dataclasses.replace(cfg_a, output_dir=str(out))
  reuse_build(monkeypatch, trainer)
  with pytest.MonkeyPatch.context() as mp:
    interrupt_training_after(mp, 3)
    with pytest.raises(KeyboardInterrupt):
      sft.run(cfg)
  assert sft.run(cfg)["last_step"] == 4  # train.resume=latest
  state_a, _ = restore_last(trainer, cfg_a, out_a, 4)
  state_b, _ = restore_last(trainer, cfg, out, 4)
  assert "tokens" in state_b.lora and jax.tree.structure(state_a) == jax.tree.structure(state_b)
  for x, y in zip(jax.tree.leaves(host(state_a)), jax.tree.leaves(host(state_b))):
    np.testing.assert_array_equal(x, y)


def test_merged_export_of_the_run_has_the_tokens_and_the_same_logits(straight_run, tmp_path):
  _, out = straight_run
  pol = policy.load(str(out))
  assert pol.model.cfg.new_tokens == tuple(pol.model.tokenizer.convert_tokens_to_ids(list(TAGS)))
  export.run(str(out), str(tmp_path / "hf"))
  back = models.load(str(tmp_path / "hf"))
  assert back.cfg.vocab_size == pol.model.cfg.vocab_size and back.cfg.new_tokens == ()
  text = tags.get_schema("reasoning").render_target("2 + 2 = 4.", "4")
  ids = back.tokenizer.encode(text, add_special_tokens=False)
  assert ids == pol.model.tokenizer.encode(text, add_special_tokens=False)
  assert back.tokenizer.decode(ids, skip_special_tokens=True) == text
  tokens = jnp.asarray([ids])
  pos = positions(jnp.ones(tokens.shape, bool))
  ours = logits(pol.model.params, pol.model.cfg,
                forward(pol.model.params, pol.model.cfg, tokens, pos, lora=pol.lora, lora_scale=pol.lora_scale), pol.lora)
  theirs = logits(back.params, back.cfg, forward(back.params, back.cfg, tokens, pos))
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=1e-5)
  with pytest.raises(UserError, match="drop --adapter-only"):
    export.run(str(out), str(tmp_path / "peft"), adapter_only=True)


def test_a_run_on_top_needs_the_same_added_tokens(straight_run):
  _, out = straight_run
  runs.check_tokens(str(out), TAGS)
  runs.check_tokens("base", ())
  with pytest.raises(UserError, match="set the same"):
    runs.check_tokens(str(out), ())
