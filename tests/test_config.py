"""Tests for tpu_reason.config (defaults, validation) and config_io (recipes, overrides, dump/load, argv)."""

import dataclasses
import functools
import importlib.resources
import pathlib

import pytest
import yaml

from tpu_reason import config_io, mesh, models
from tpu_reason.config import Config, DataCfg, LoraCfg, MeshCfg, ModelCfg, SamplingCfg
from tpu_reason.errors import UserError

RECIPES_DIR = pathlib.Path(__file__).resolve().parent.parent / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_defaults_build():
  cfg = config_io.load(Config)
  assert cfg == Config()
  assert cfg.model == ModelCfg() and cfg.lora == LoraCfg() and cfg.mesh == MeshCfg()
  assert cfg.sampling == SamplingCfg() and cfg.data == DataCfg()
  assert config_io.build(Config, {}) == cfg
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.model.spec = "other"  # type: ignore[misc]


def test_recipes_directory_is_found():
  assert config_io.RECIPES.is_dir()
  assert len(RECIPES) >= 1
  assert "smollm2-135m-cpu.yaml" in {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
  text = path.read_text()
  assert text.startswith("# "), "every recipe opens with a one-line comment"
  raw = yaml.safe_load(text)
  cfg = config_io.load(Config, path)
  assert cfg != Config() or path.name == "smollm2-135m-cpu.yaml"
  # the recipe's values are really used (not silently dropped), at their current keys (no moved ones)
  assert not set(config_io.flatten(raw)) & set(config_io.MOVED)
  for key, value in config_io.flatten(raw).items():
    got = functools.reduce(getattr, key.split("."), cfg)
    assert got == (tuple(value) if isinstance(value, list) else value), key
  # model spec: embedded, or an org/name hub id
  assert cfg.model.spec in models.known_specs() or cfg.model.spec.count("/") == 1
  # the mesh builds on the 8 devices of this session (a v5e-8 has 8 chips)
  m = mesh.make_mesh(cfg.mesh)
  assert m.shape["fsdp"] * m.shape["tp"] == 8
  if cfg.mesh.fsdp != -1:  # batches are split over fsdp: every (micro-)batch must divide evenly
    assert (cfg.train.batch_size // cfg.train.grad_accum) % cfg.mesh.fsdp == 0


def test_recipes_are_the_package_resource():
  # tpu_reason.recipes (pyproject.toml maps the repo's recipes/ in): what an installed wheel finds
  assert config_io.RECIPES == pathlib.Path(str(importlib.resources.files("tpu_reason.recipes")))
  assert config_io.recipe_names() == [p.stem for p in RECIPES]


@pytest.mark.parametrize("name", ["smollm2-135m-cpu", "smollm2-135m-cpu.yaml", "recipes/smollm2-135m-cpu.yaml"])
def test_recipe_found_by_name_anywhere(tmp_path, monkeypatch, name):
  monkeypatch.chdir(tmp_path)  # no recipes/ here: the packaged recipe of that name
  assert config_io.recipe_path(name) == config_io.RECIPES / "smollm2-135m-cpu.yaml"
  assert config_io.load(Config, name) == config_io.load(Config, config_io.RECIPES / "smollm2-135m-cpu.yaml")


def test_a_file_wins_over_a_packaged_recipe_of_the_same_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  pathlib.Path("smollm2-135m-cpu.yaml").write_text("lora:\n  rank: 3\n")
  assert config_io.load(Config, "smollm2-135m-cpu.yaml").lora.rank == 3
  assert config_io.load(Config, "smollm2-135m-cpu").lora.rank == 16  # no such file: the packaged one


def test_list_recipes(capsys):
  with pytest.raises(SystemExit) as e:
    config_io.parse_args(Config, ["--list-recipes"])
  assert e.value.code == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines] == [p.stem for p in RECIPES]
  default = next(line for line in lines if line.startswith("smollm2-135m-cpu "))
  assert default.split(None, 1)[1] == (RECIPES_DIR / "smollm2-135m-cpu.yaml").read_text().splitlines()[0][2:]


def test_default_recipe_contents():
  cfg = config_io.load(Config, config_io.RECIPES / "smollm2-135m-cpu.yaml")
  assert cfg.model.spec == "smollm2-135m" and cfg.model.dtype == "float32"
  assert (cfg.lora.rank, cfg.lora.alpha) == (16, 32.0)
  assert (cfg.data.source, cfg.data.task, cfg.data.schema) == ("reasoning_gym", "gsm_symbolic", "reasoning")
  assert (cfg.data.max_prompt_tokens, cfg.data.max_completion_tokens) == (160, 256)  # CPU: trimmed padding
  assert cfg.data.completion_buckets == (128, 256)
  assert cfg.sampling.max_new_tokens == 512


def test_overrides_are_coerced_to_field_types():
  cfg = config_io.load(Config, None, ["sampling.temperature=0.7", "data.completion_buckets=[128,256]"])
  assert cfg.sampling.temperature == 0.7 and type(cfg.sampling.temperature) is float
  assert cfg.data.completion_buckets == (128, 256)
  assert all(type(b) is int for b in cfg.data.completion_buckets)
  cfg = config_io.load(Config, None, [
      "sampling.temperature=1", "lora.alpha=8", "lora.rank=16.0", "model.remat=yes", "data.strict=no",
      "data.completion_buckets=64,128", "name=run1", "data.system_prompt=Think step by step"])
  assert type(cfg.sampling.temperature) is float and cfg.sampling.temperature == 1.0
  assert type(cfg.lora.alpha) is float and type(cfg.lora.rank) is int and cfg.lora.rank == 16
  assert cfg.model.remat == "full" and cfg.data.strict is False  # yes/no: YAML's booleans
  assert cfg.data.completion_buckets == (64, 128)
  assert cfg.name == "run1" and cfg.data.system_prompt == "Think step by step"


def test_overrides_win_over_recipe_and_apply_in_order():
  recipe = config_io.RECIPES / "smollm2-135m-cpu.yaml"
  cfg = config_io.load(Config, recipe, ["lora.rank=8", "lora.rank=4", "--mesh.tp=2"])
  assert cfg.lora.rank == 4 and cfg.mesh.tp == 2
  assert cfg.model.spec == "smollm2-135m"  # untouched recipe values survive


def _user_error(overrides, recipe=None) -> str:
  with pytest.raises(UserError) as e:
    config_io.load(Config, recipe, overrides)
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def test_unknown_key_is_named():
  msg = _user_error(["model.nope=1"])
  assert "unknown config key" in msg and "model." in msg and "nope" in msg
  assert "spec" in msg  # lists the valid keys
  assert "nope" in _user_error(["nope.x=1"])
  assert "typo" in _user_error(["typo=1"])


@pytest.mark.parametrize("override,field", [
    ("sampling.top_p=2", "sampling.top_p"),
    ("sampling.top_p=0", "sampling.top_p"),
    ("sampling.temperature=-1", "sampling.temperature"),
    ("sampling.temperature=hot", "sampling.temperature"),
    ("lora.rank=abc", "lora.rank"),
    ("lora.rank=1.5", "lora.rank"),
    ("lora.rank=0", "lora.rank"),
    ("lora.alpha=-2", "lora.alpha"),
    ("model.dtype=float16", "model.dtype"),
    ("model.remat=maybe", "model.remat"),
    ("data.schema=xml", "data.schema"),
    ("data.completion_buckets=[128,1024]", "data.completion_buckets"),
    ("data.completion_buckets=[a,b]", "data.completion_buckets"),
    ("mesh.tp=0", "mesh"),
    ("grpo.importance_level=word", "grpo.importance_level"),
    ("grpo.gspo_epsilon_high=-1", "grpo.gspo_epsilon"),
    ("grpo.overlong_buffer=-1", "grpo.overlong_buffer"),
    ("grpo.overlong_buffer=193", "grpo.overlong_buffer"),  # more than max_new_tokens (192)
    ("grpo.overlong_penalty=-1", "grpo.overlong_penalty"),
    ("grpo.reward_aggregation=mean", "grpo.reward_aggregation"),
])
def test_bad_values_are_user_errors(override, field):
  assert field in _user_error([override])


def _registries():
  """Each enumerated config field and the names its implementing module accepts."""
  from tpu_reason import choices, rewards, tags
  from tpu_reason.data import sources

  return {"data.schema": tuple(tags.SCHEMAS), "data.source": tuple(sources.LOADERS),
          "grpo.rewards": tuple(rewards.REWARDS), "grpo.loss": choices.GRPO_LOSSES,
          "grpo.scale_rewards": choices.ADVANTAGE_SCALES, "grpo.importance_level": choices.IMPORTANCE_LEVELS,
          "grpo.reward_aggregation": choices.REWARD_AGGREGATIONS, "model.remat": choices.REMAT,
          "model.quant": choices.QUANT, "model.dtype": choices.DTYPES, "train.optim.schedule": choices.SCHEDULES,
          "curate.strata": choices.STRATA}


@pytest.mark.parametrize("field", list(_registries()))
def test_bad_choice_is_one_line_naming_the_valid_ones(field):
  valid = _registries()[field]
  extra = ["grpo.reward_weights=[1]"] if field == "grpo.rewards" else []
  msg = _user_error([f"{field}=nope", *extra])
  assert msg == f"{field} must be one of {', '.join(valid)}, got 'nope'"


@pytest.mark.parametrize("field", list(_registries()))
def test_every_valid_choice_parses(field):
  for name in _registries()[field]:
    extra = ["grpo.reward_weights=[1]"] if field == "grpo.rewards" else []
    cfg = config_io.load(Config, None, [f"{field}={name}", *extra])
    assert config_io.flatten(config_io.to_dict(cfg))[field] in (name, (name,))


def test_unknown_reward_in_a_list_is_named():
  msg = _user_error(["grpo.rewards=[format,proces]", "grpo.reward_weights=[1,1]"])
  assert msg == "grpo.rewards must be one of format, format_soft, process, outcome, got 'proces'"


@pytest.mark.parametrize("module", ["tpu_reason.config", "tpu_reason.config_io"])
def test_reading_a_config_loads_no_jax_nor_maths(module):
  """Every CLI's --help pays for these imports: the choices' names come from `choices`, not their modules."""
  import subprocess
  import sys

  code = (f"import sys, {module}; heavy = [m for m in ('jax', 'math_verify', 'sympy') if m in sys.modules]; "
          "assert not heavy, f'{heavy} imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_malformed_overrides():
  assert "key.sub=value" in _user_error(["lora.rank"])
  assert "mapping" in _user_error(["model=3"])
  assert "not a section" in _user_error(["model.spec=x", "model.spec.y=1"])


@pytest.mark.parametrize("override", ["model.spec.x=1", "lora.rank=true", "train.optim.lr=[1]"])
def test_wrongly_typed_values_are_user_errors(override):
  _user_error([override])


def test_wrongly_typed_recipe_value_is_user_error(tmp_path):
  recipe = tmp_path / "r.yaml"
  recipe.write_text("name: [1, 2]\n")
  assert "must be a string" in _user_error([], recipe)


def test_string_override_with_colon_is_kept_verbatim():
  cfg = config_io.load(Config, None, ["data.system_prompt=Think step by step: answer"])
  assert cfg.data.system_prompt == "Think step by step: answer"


def test_missing_and_invalid_recipe_files(tmp_path):
  assert "recipe not found" in _user_error([], tmp_path / "nope.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed\n")
  assert "invalid YAML" in _user_error([], bad)
  flat = tmp_path / "flat.yaml"
  flat.write_text("- just\n- a list\n")
  assert "mapping" in _user_error([], flat)
  unknown = tmp_path / "unknown.yaml"
  unknown.write_text("lora:\n  rnak: 4\n")
  assert "rnak" in _user_error([], unknown)
  empty = tmp_path / "empty.yaml"
  empty.write_text("# nothing here\n")
  assert config_io.load(Config, empty) == Config()


def test_dump_round_trips(tmp_path):
  cfg = config_io.load(Config, config_io.RECIPES / "smollm2-135m-cpu.yaml", [
      "sampling.temperature=0.7", "data.completion_buckets=[128,256]",
      "name=x", "mesh.fsdp=4", "mesh.tp=2", "model.dtype=bfloat16"])
  # strings YAML would misread if written unquoted
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(
      cfg.data, system_prompt="Answer: think first # then answer\n- step 1", path="yes"))
  text = config_io.dump(cfg)
  assert "completion_buckets" in text and "!!python" not in text  # plain YAML, no python tags
  path = tmp_path / "dumped.yaml"
  path.write_text(text)
  assert config_io.load(Config, path) == cfg
  saved = config_io.save(cfg, tmp_path / "run")
  assert saved == tmp_path / "run" / "config.yaml"
  assert config_io.load(Config, saved) == cfg
  assert config_io.load(Config, saved) != Config()


def test_parse_args():
  recipe = str(config_io.RECIPES / "smollm2-135m-cpu.yaml")
  cfg, flags = config_io.parse_args(Config, ["--config", recipe, "lora.rank=4", "sampling.top_k=5"])
  assert flags == {}
  assert cfg.lora.rank == 4 and cfg.sampling.top_k == 5 and cfg.model.spec == "smollm2-135m"
  assert cfg.data.completion_buckets == (128, 256)  # from the recipe
  same, _ = config_io.parse_args(Config, [f"--config={recipe}", "--lora.rank=4", "sampling.top_k=5"])
  assert same == cfg
  assert config_io.parse_args(Config, ["lora.rank=2"])[0] == dataclasses.replace(Config(), lora=LoraCfg(rank=2))


def test_parse_args_extra_flags():
  extra = {"--model": "model.spec", "--out": "out", "--raw": "raw?"}
  cfg, flags = config_io.parse_args(Config, ["--model", "gemma3-270m", "--out", "dir", "lora.rank=3", "--raw"], extra)
  assert cfg.model.spec == "gemma3-270m" and cfg.lora.rank == 3
  assert flags == {"out": "dir", "raw": "true"}  # a switch ("raw?") takes no value: "true"
  cfg, flags = config_io.parse_args(Config, ["--model=x/y", "--raw"], extra)
  assert cfg.model.spec == "x/y" and flags == {"raw": "true"}
  # a shorthand flag goes through the same validation as an override
  with pytest.raises(UserError, match="unknown config key"):
    config_io.parse_args(Config, ["--lr", "1"], {"--lr": "optim.lr"})


def test_valueless_flag_does_not_swallow_an_override():
  cfg, flags = config_io.parse_args(Config, ["--raw", "lora.rank=3"], {"--raw": "raw?"})
  assert cfg.lora.rank == 3 and flags == {"raw": "true"}


def test_parse_args_errors_and_help():
  with pytest.raises(UserError, match="--config needs a value"):
    config_io.parse_args(Config, ["--config"])
  with pytest.raises(UserError, match="--config needs a value"):
    config_io.parse_args(Config, ["--config", "--model", "x"], {"--model": "model.spec"})
  with pytest.raises(UserError, match="unknown flag --verbose"):
    config_io.parse_args(Config, ["--verbose"])
  with pytest.raises(UserError, match="recipe not found: no-such-recipe.yaml .*packaged recipes: .*smollm2-135m-cpu"):
    config_io.parse_args(Config, ["--config", "no-such-recipe.yaml"])
  with pytest.raises(SystemExit) as e:
    config_io.parse_args(Config, ["--help"], {"--model": "model.spec"})
  usage = str(e.value.code)
  assert "[--model ...]" in usage and "lora.rank = 16" in usage and "sampling.top_p = 1.0" in usage
  assert "--list-recipes" in usage and "smollm2-135m-cpu" in usage


def test_output_dir():
  assert config_io.load(Config, None, ["output_dir=/tmp/x"]).resolved_output_dir() == pathlib.Path("/tmp/x")
  auto = config_io.load(Config, None, ["name=exp"]).resolved_output_dir()
  assert auto.parent == pathlib.Path("runs") and auto.name.startswith("exp-")
  cfg = config_io.load(Config, None, ["name=exp"])
  assert cfg.resolved_output_dir("grpo").name.startswith("exp-grpo-20")
  assert cfg.resolved_output_dir("eval", named=False).name.startswith("eval-20")
  assert cfg.resolved_output_dir("curate", timestamp=False) == pathlib.Path("runs/exp-curate")  # reruns resume


def test_a_shared_section_overridden_in_part_keeps_its_parents_defaults():
  cfg = config_io.load(Config, None, ["grpo.sampling.temperature=0.5", "curate.sampling.top_k=7", "grpo.optim.lr=1e-5"])
  assert cfg.grpo.sampling == SamplingCfg(max_new_tokens=192, temperature=0.5, top_k=50)  # GRPO's, not SamplingCfg()'s
  assert cfg.curate.sampling == SamplingCfg(max_new_tokens=256, temperature=0.7, top_k=7)
  assert (cfg.grpo.optim.lr, cfg.grpo.optim.warmup_steps, cfg.train.optim.lr) == (1e-5, 2, 1e-3)
  assert cfg.sampling == SamplingCfg()  # the top-level one is untouched


@pytest.mark.parametrize("override,message", [
    ("grpo.sampling.top_p=2", "grpo.sampling.top_p must be in (0, 1]"),
    ("curate.sampling.top_k=-1", "curate.sampling.top_k must be >= 0"),
    ("sampling.top_p=0", "sampling.top_p must be in (0, 1]"),
    ("train.optim.lr=0", "train.optim.lr must be > 0"),
    ("grpo.optim.clip_norm=0", "grpo.optim.weight_decay must be >= 0 and grpo.optim.clip_norm > 0"),
    ("grpo.sampling.temperature=0", "grpo.sampling.temperature must be > 0"),
])
def test_a_shared_sections_errors_name_the_place_it_sits(override, message):
  with pytest.raises(UserError) as e:
    config_io.load(Config, None, [override])
  assert str(e.value).startswith(message)


def test_moved_keys_load_at_their_new_place_with_a_note(tmp_path, capsys):
  assert set(config_io.MOVED.values()) <= set(config_io.flatten(config_io.to_dict(Config())))
  old = tmp_path / "old-run.yaml"  # a run's config.yaml from before the sections
  old.write_text("train:\n  lr: 0.002\n  vocab_chunk: 64\ngrpo:\n  temperature: 0.5\n  lr: 1.0e-5\n")
  cfg = config_io.load(Config, old, ["grpo.top_k=3", "grpo.optim.lr=3e-6"])
  assert (cfg.train.optim.lr, cfg.model.vocab_chunk) == (0.002, 64)
  assert (cfg.grpo.sampling.temperature, cfg.grpo.sampling.top_k, cfg.grpo.sampling.max_new_tokens) == (0.5, 3, 192)
  assert cfg.grpo.optim.lr == 3e-6  # the command line's new key wins over the file's old one
  err = capsys.readouterr().err
  assert "train.lr is now train.optim.lr" in err and "grpo.top_k is now grpo.sampling.top_k" in err


def test_peak_flops_comes_from_the_device_kind_unless_set():
  assert mesh.peak_flops(MeshCfg()) == mesh.PEAK_FLOPS["cpu"]  # the test devices are CPUs
  assert mesh.peak_flops(MeshCfg(peak_flops=1e12)) == 1e12
