"""Export: merged Hugging Face dirs read back by our loader (identical weights and logits) and by
transformers (when torch is installed), PEFT-layout adapters, CLI errors."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import write_run
from tpu_reason import export, lora as lora_lib, models, policy
from tpu_reason.models import convert
from tpu_reason.models.transformer import forward, logits
from tpu_reason.tree import flatten

pytestmark = pytest.mark.slow  # whole exports read back

SPECS = ("tiny-llama", "tiny-gemma3")
TOKENS_BxT = np.array([[1, 17, 42, 99, 7, 1000, 5, 23, 311, 4, 8, 64], [2, 9, 9, 9, 500, 3, 77, 1, 2, 3, 4, 5]])


@pytest.fixture(scope="module", params=SPECS)
def exported(request, tmp_path_factory):
  """(run dir with a non-zero LoRA, its policy, its merged export dir) per architecture."""
  run, _ = write_run(tmp_path_factory.mktemp("run") / request.param, request.param)
  out = tmp_path_factory.mktemp("hf") / request.param
  export.main(["--checkpoint", str(run), "--out", str(out)])
  return run, policy.load(str(run)), out


def _explicit(cfg):
  """`cfg` with the default query scale written out (HF configs always state it)."""
  return dataclasses.replace(cfg, query_scale=cfg.query_scale or cfg.head_dim**-0.5)


def _logits(params, cfg, lora=None, lora_scale=1.0):
  pos = jnp.broadcast_to(jnp.arange(TOKENS_BxT.shape[1]), TOKENS_BxT.shape)
  h = forward(params, cfg, jnp.asarray(TOKENS_BxT), pos, lora=lora, lora_scale=lora_scale)
  return np.asarray(logits(params, cfg, h))


def test_merged_export_reads_back_with_identical_weights_and_logits(exported):
  _, pol, out = exported
  back = models.load(str(out))
  assert _explicit(back.cfg) == _explicit(pol.model.cfg) and back.eos_ids == pol.model.eos_ids
  merged = lora_lib.merge(pol.model.params, pol.lora, pol.lora_scale)
  for name, want in flatten(merged).items():
    np.testing.assert_array_equal(flatten(back.params)[name], np.asarray(want), err_msg=name)
  np.testing.assert_array_equal(_logits(back.params, back.cfg), _logits(merged, pol.model.cfg))
  # ... and the merge is the adapter: the same model as base + LoRA applied in the forward
  adapted = _logits(pol.model.params, pol.model.cfg, pol.lora, pol.lora_scale)
  np.testing.assert_allclose(_logits(back.params, back.cfg), adapted, atol=2e-5)
  assert np.abs(adapted - _logits(pol.model.params, pol.model.cfg)).max() > 1e-2  # the LoRA matters
  chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2+3?"}]
  assert back.chat_prompt(chat, "<reasoning>\n") == pol.model.chat_prompt(chat, "<reasoning>\n")
  assert back.encode("What is 2+3?") == pol.model.encode("What is 2+3?")
  assert (out / "NOTICE").exists() == pol.model.cfg.family.startswith("gemma")


def test_merged_export_loads_in_transformers(exported):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM, AutoTokenizer

  _, pol, out = exported
  hf_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf_model(torch.tensor(TOKENS_BxT)).logits.numpy()
  ours = _logits(pol.model.params, pol.model.cfg, pol.lora, pol.lora_scale)
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  tok = AutoTokenizer.from_pretrained(str(out))
  chat = [{"role": "user", "content": "What is 2+3?"}]
  assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == pol.model.chat_prompt(chat)


def test_adapter_only_export_is_the_merge_delta_in_peft_layout(exported, tmp_path):
  from safetensors.numpy import load_file

  run, pol, merged_dir = exported
  out = export.run(str(run), str(tmp_path), adapter_only=True)
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8.0)
  assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  adapter = load_file(out / "adapter_model.safetensors")
  assert len(adapter) == 2 * 7 * pol.model.cfg.num_layers
  norm_plus_one = pol.model.cfg.family.startswith("gemma")
  base = convert.params_to_hf(pol.model.cfg, pol.model.params, norm_plus_one=norm_plus_one)
  merged = load_file(merged_dir / "model.safetensors")
  scale = cfg["lora_alpha"] / cfg["r"]
  for key in [k for k in adapter if ".lora_A." in k]:
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]
    assert a.shape[0] == b.shape[1] == 4
    np.testing.assert_allclose(base[module + ".weight"] + scale * b @ a, merged[module + ".weight"], atol=1e-5,
                               err_msg=module)


def test_base_spec_exports_without_lora(tmp_path):
  out = export.run("tiny-llama", str(tmp_path / "base"))
  back, base = models.load(str(out)), models.load("tiny-llama")
  for name, want in flatten(base.params).items():
    np.testing.assert_array_equal(flatten(back.params)[name], want, err_msg=name)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "tiny-llama"], "usage: python -m tpu_reason.export"),
    (["--checkpoint", "tiny-llama", "--out", "{tmp}", "--adapter-only"], "has no LoRA to export"),
    (["--checkpoint", "{tmp}/nope", "--out", "{tmp}/o"], "unknown model"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    export.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err
