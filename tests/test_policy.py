"""Loading a model + LoRA from a spec, a run dir or a checkpoint dir (tpu_reason.policy)."""

import jax
import numpy as np
import pytest

from tpu_reason import config_io, mesh as mesh_lib, policy
from tpu_reason.config import Config, MeshCfg
from tpu_reason.errors import UserError
from tpu_reason.tree import flatten


def _same(a, b):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_run_dir_loads_base_and_best_lora(tiny_run):
  run, loras = tiny_run
  pol = policy.load(str(run))
  assert pol.model.name == "tiny-llama" and pol.run_config.lora.rank == 4
  assert pol.lora_scale == 8 / 4
  assert pol.source.endswith("checkpoints/best/1 on tiny-llama")
  _same(pol.lora, loras[1])  # best (eval_loss 0.5) beats the later step 2


@pytest.mark.parametrize("sub, step", [("checkpoints", 1), ("checkpoints/last", 2), ("checkpoints/best", 1),
                                       ("checkpoints/last/1", 1)])
def test_checkpoint_dirs_pick_their_step(tiny_run, sub, step):
  run, loras = tiny_run
  pol = policy.load(str(run / sub))
  _same(pol.lora, loras[step])


def test_plain_spec_has_no_lora():
  pol = policy.load("tiny-llama")
  assert pol.lora is None and pol.run_config is None and pol.source == "tiny-llama"


def test_run_without_checkpoints_is_a_user_error(tmp_path):
  (tmp_path / "checkpoints" / "last").mkdir(parents=True)
  (tmp_path / "config.yaml").write_text("name: x\n")
  with pytest.raises(UserError, match="no completed checkpoint"):
    policy.load(str(tmp_path))


def test_run_dir_and_run_config(tiny_run, tmp_path):
  run, _ = tiny_run
  assert policy.run_dir(str(run / "checkpoints" / "last" / "2")) == run
  assert policy.run_dir("tiny-llama") is None and policy.run_dir(str(tmp_path)) is None
  argv = policy.with_run_config(["sampling.max_new_tokens=8"], ["tiny-llama", str(run)])
  assert argv == ["--config", str(run / "config.yaml"), "output_dir=", "sampling.max_new_tokens=8"]
  cfg, _ = config_io.parse_args(Config, argv)
  assert cfg.model.spec == "tiny-llama" and cfg.lora.rank == 4 and cfg.output_dir == ""
  assert policy.with_run_config(["--config", "x.yaml"], [str(run)]) == ["--config", "x.yaml"]


def test_place_shards_params_and_lora_by_the_table(tiny_run):
  mesh = mesh_lib.make_mesh(MeshCfg(fsdp=-1, tp=1))
  pol = policy.load(str(tiny_run[0]))
  params, lora = policy.place(pol, mesh)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves((params, lora)))
  embed = params["embed"]
  assert embed.sharding.mesh.shape == mesh.shape and embed.sharding.spec != jax.sharding.PartitionSpec()
  _same(lora, pol.lora)


@pytest.mark.slow
def test_grpo_run_loads_on_top_of_its_init_run(tiny_run, tmp_path):
  """A GRPO run's adapter applies to the base with its init (SFT) run's best adapter merged in."""
  from tests.conftest import write_run
  from tpu_reason import lora as lora_lib, models

  sft_run, sft_loras = tiny_run
  grpo_run, grpo_loras = write_run(tmp_path / "grpo", trainer="grpo", init=str(sft_run), seed=7)
  pol = policy.load(str(grpo_run))
  _same(pol.lora, grpo_loras[1])
  merged = lora_lib.merge(models.load("tiny-llama").params, sft_loras[1], 2.0)
  _same(pol.model.params, jax.tree.map(np.asarray, merged))
  assert pol.base == str(sft_run) and pol.source.endswith(f"on tiny-llama + {sft_run}")
  assert policy.load(str(sft_run)).base == "tiny-llama"
