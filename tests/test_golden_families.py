"""Golden parity per architecture family, without torch: tiny random checkpoints saved by
transformers (tests/golden/families/<family>/) load through our Hugging Face loader and give
transformers' logits; their merged LoRA export reads back and gives transformers' logits of the
same merge. Regenerate with tests/golden/make_family_golden.py (needs torch)."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import TINY_JIT
from tpu_reason import export, lora as lora_lib, models, policy
from tpu_reason.config import LoraCfg
from tpu_reason.errors import UserError
from tpu_reason.models import hf
from tpu_reason.models.transformer import forward, logits
from tpu_reason.tree import unflatten

pytestmark = pytest.mark.slow  # real weights against transformers

GOLDEN = Path(__file__).resolve().parent / "golden" / "families"
# Our f32 forward vs transformers' f32 forward on the same weights; only reduction order differs.
ATOL = 1e-4
# What each checkpoint must exercise (so a loader that silently drops a feature cannot pass).
FEATURES = {
    "llama": dict(tie_embeddings=False, norm_eps=1e-5, rope_theta=500_000.0),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, tie_embeddings=False),
    "gemma2": dict(post_norms=True, attn_softcap=2.0, final_softcap=10.0, sliding_window=8, global_every=2,
                   query_scale=32**-0.5),
    "gemma3": dict(qk_norm=True, post_norms=True, sliding_window=8, global_every=3, rope_theta=1_000_000.0,
                   rope_local_theta=10_000.0, query_scale=32**-0.5),
}

fwd = jax.jit(forward, static_argnames=("cfg",), compiler_options=TINY_JIT)


@pytest.fixture(scope="module", params=sorted(FEATURES))
def family(request):
  """(family, model loaded from its transformers-saved dir, golden npz)."""
  name = request.param
  return name, models.load(str(GOLDEN / name)), dict(np.load(GOLDEN / f"{name}.npz"))


def _logits(model, ids, lora=None, lora_scale=1.0, cfg=None):
  cfg = cfg or model.cfg
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  h = fwd(model.params, cfg, jnp.asarray(ids), pos, lora=lora, lora_scale=lora_scale)
  return np.asarray(logits(model.params, cfg, h))


def _lora_from_peft(golden, cfg):
  """The golden LoRA (PEFT layout: lora_A [r, in], lora_B [out, r]) as our adapter pytree."""
  flat = {}
  rank = next(v for k, v in golden.items() if k.endswith(".lora_A")).shape[0]
  targets = "|".join(export.PEFT_MODULES)
  for name, (shape, _) in lora_lib.shapes(cfg, LoraCfg(rank=rank, targets=targets)).items():
    _, proj, ab = name.split("/")
    module = export.PEFT_MODULES[proj]  # e.g. self_attn.q_proj
    per_layer = []
    for i in range(cfg.num_layers):
      key = f"lora.model.layers.{i}.{module}.lora_{ab.upper()}"
      per_layer.append(golden[key].T.reshape(shape[1:]))  # [in.., r] or [r, out..]
    flat[name] = jnp.asarray(np.stack(per_layer), jnp.float32)
  return unflatten(flat)


def test_checkpoint_exercises_the_family(family):
  name, model, golden = family
  assert model.cfg.family == name
  for field, want in FEATURES[name].items():
    assert getattr(model.cfg, field) == pytest.approx(want), field
  if model.cfg.sliding_window is not None:
    assert golden["ids"].shape[1] > 2 * model.cfg.sliding_window


def test_logits_match_transformers(family):
  name, model, golden = family
  ours = _logits(model, golden["ids"])
  assert ours.shape == golden["logits"].shape
  diff = np.abs(ours - golden["logits"]).max()
  assert diff < ATOL, f"{name}: max |ours - transformers| = {diff:.2e}"
  if model.cfg.sliding_window is not None:  # the window changes these logits (the golden would catch a bug)
    full = _logits(model, golden["ids"], cfg=dataclasses.replace(model.cfg, sliding_window=None))
    assert np.abs(full - golden["logits"]).max() > 1e-2


def test_merged_export_matches_transformers_merge(family, tmp_path):
  name, model, golden = family
  lora, scale = _lora_from_peft(golden, model.cfg), float(golden["lora_scale"])
  adapted = _logits(model, golden["ids"], lora, scale)
  assert np.abs(golden["merged_logits"] - golden["logits"]).max() > 0.1  # the LoRA matters
  # the adapter applied in our forward is transformers' W + scale * B @ A
  np.testing.assert_allclose(adapted, golden["merged_logits"], atol=ATOL, rtol=0, err_msg=name)

  out = export.export(policy.Policy(model, lora, scale, None, name, name), tmp_path / name)
  back = models.load(str(out))
  assert back.cfg == model.cfg
  exported = _logits(back, golden["ids"])
  np.testing.assert_allclose(exported, adapted, atol=ATOL, rtol=0, err_msg=name)
  np.testing.assert_allclose(exported, golden["merged_logits"], atol=ATOL, rtol=0, err_msg=name)


# A family checkpoint with a scaled RoPE in its config (make_family_golden.ROPE_VARIANTS) -> its family.
ROPE_VARIANTS = {"llama-rope-llama3": "llama", "gemma3-rope-linear": "gemma3"}


def _with_rope(variant, tmp_path, rope_parameters):
  """The family checkpoint of `variant` with `rope_parameters` written into its config.json."""
  path = shutil.copytree(GOLDEN / ROPE_VARIANTS[variant], tmp_path / variant)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "rope_parameters": rope_parameters}))
  return path


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_scaled_rope_matches_transformers(variant, tmp_path):
  golden = np.load(GOLDEN / f"{variant}.npz")
  model = models.load(str(_with_rope(variant, tmp_path, json.loads(str(golden["rope_parameters"])))))
  assert model.cfg.rope_type == {"llama": "llama3", "gemma3": "linear"}[model.cfg.family]
  ours = _logits(model, golden["ids"])
  diff = np.abs(ours - golden["logits"]).max()
  assert diff < ATOL, f"{variant}: max |ours - transformers| = {diff:.2e}"
  # an export keeps the scaling
  out = export.export(policy.Policy(model, None, 1.0, None, variant, variant), tmp_path / "export")
  back = models.load(str(out))
  assert back.cfg == model.cfg
  np.testing.assert_allclose(_logits(back, golden["ids"]), ours, atol=ATOL, rtol=0, err_msg=variant)


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_legacy_rope_scaling_reads_the_same(variant):
  """Configs saved before transformers 5 (Llama-3.1, Gemma-3 4B) say rope_theta + rope_scaling."""
  rope = json.loads(str(np.load(GOLDEN / f"{variant}.npz")["rope_parameters"]))
  config = json.loads((GOLDEN / ROPE_VARIANTS[variant] / "config.json").read_text())
  scaled = rope.get("full_attention", rope)
  legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
  legacy.update(rope_theta=scaled["rope_theta"], rope_scaling={k: v for k, v in scaled.items() if k != "rope_theta"})
  if "sliding_attention" in rope:
    legacy["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
  assert hf.config_from_hf(legacy) == hf.config_from_hf({**config, "rope_parameters": rope})


@pytest.mark.parametrize("rope_type, params", [
    ("yarn", dict(factor=4.0, original_max_position_embeddings=64)), ("dynamic", dict(factor=4.0)),
    ("longrope", dict(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=64))])
def test_unsupported_rope_scaling_is_a_one_line_user_error(rope_type, params, tmp_path):
  path = _with_rope("llama-rope-llama3", tmp_path, {"rope_type": rope_type, "rope_theta": 500_000.0, **params})
  assert models.load(str(path), weights=False).cfg.rope_type == rope_type  # tokenizer-only users may proceed
  with pytest.raises(UserError) as e:
    models.load(str(path))
  msg = str(e.value)
  assert "\n" not in msg and repr(rope_type) in msg and "not supported" in msg
