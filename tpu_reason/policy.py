"""A model plus its LoRA from one spec: a model spec, a training run directory, or a checkpoint.

Run directories (the `output_dir` of sft / grpo) hold `config.yaml` and
`checkpoints/{best,last}/<step>`; the LoRA comes from the best checkpoint, else the
latest, unless the spec names `best/`, `last/` or a step directory itself. The base model
and LoRA settings come from the config saved with that checkpoint; a GRPO run's adapter
applies to the base with its init run's adapters merged in (`runs.base_params`), so those
are merged into the loaded weights. Eval, chat and export load through `load`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason import checkpoint, config_io, lora as lora_lib, models, runs, sharding as sharding_lib
from tpu_reason.config import Config
from tpu_reason.errors import UserError
from tpu_reason.sampling import layout


@dataclasses.dataclass
class Policy:
  """Base model (host weights), its LoRA (None for a plain model) and where they came from."""

  model: models.Model
  lora: Any
  lora_scale: float
  run_config: Config | None  # the config saved with the checkpoint
  source: str  # for logs: "runs/x/checkpoints/best/40 on smollm2-135m"
  base: str  # what the LoRA applies to: the model spec, or the init run merged into `model.params`

  @property
  def lora_cfg(self):
    return None if self.run_config is None else self.run_config.lora


def run_dir(spec: str) -> Path | None:
  """The training run directory `spec` is or lies in (it holds config.yaml), else None."""
  path = Path(spec)
  if not path.is_dir() or checkpoint.find_step(path) is None:
    return None
  return next((p for p in (path, *path.parents) if (p / "config.yaml").is_file()), None)


def with_run_config(argv: list[str], specs: list[str]) -> list[str]:
  """argv with the first run's config.yaml as the recipe (output_dir reset), unless --config is given.

  So eval and chat render prompts with the tag schema and system prompt the run trained on.
  """
  if any(a.split("=", 1)[0] == "--config" for a in argv):
    return argv
  run = next((r for r in map(run_dir, specs) if r is not None), None)
  return argv if run is None else ["--config", str(run / "config.yaml"), "output_dir=", *argv]


def _init_run(spec: str) -> str:
  """The run whose adapters the run at `spec` trained on top of ("base": none)."""
  run = run_dir(spec)
  if run is None or not (run / "run.json").exists():
    return "base"
  return runs.info(run).get("init", "base")


def load(spec: str, dtype: str = "float32") -> Policy:
  """Base model + LoRA for `spec` (a model spec, run dir, checkpoints dir or step dir)."""
  path = Path(spec)
  step = checkpoint.find_step(path) if path.is_dir() else None
  if step is None:
    check_plain(spec)
    return Policy(models.load(spec, jnp.dtype(dtype)), None, 1.0, None, spec, spec)
  lora, run_cfg = _saved_lora(step)
  model = models.load_for(run_cfg.model, jnp.dtype(dtype))
  base, source = run_cfg.model.spec, f"{step} on {run_cfg.model.spec}"
  init = _init_run(spec)
  if init != "base":
    model.params = jax.tree.map(np.asarray, runs.apply_init(init, model.params, model.cfg.new_tokens))
    base, source = init, f"{source} + {init}"
  lora = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), lora)
  return Policy(model, lora, lora_lib.scale(run_cfg.lora), run_cfg, source, base)


def check_plain(spec: str):
  """A spec that is no checkpoint: refuse a run directory without one before it is taken for a model directory."""
  path = Path(spec)
  if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "run.json").exists()):
    raise UserError(f"{spec}: a training run with no completed checkpoint (under {path / 'checkpoints'})")
  if path.is_dir() and not (path / "config.json").exists():
    raise UserError(f"{spec}: neither a training run (no checkpoints/) nor a Hugging Face model directory (no "
                    "config.json)")
  if spec.endswith(".gguf") and not path.is_file():
    raise UserError(f"GGUF file not found: {spec}")


def _saved_lora(step: Path) -> tuple[Any, Config]:
  """(LoRA, the run's config) of one saved step, the config's moved keys at their new place."""
  try:
    lora, meta = checkpoint.restore_lora(step)
  except UserError:
    raise  # already one line naming the step
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"{step}: cannot restore its LoRA: {e}") from None
  if "config" not in meta:
    raise UserError(f"{step}: the checkpoint's meta has no config (not saved by tpu_reason)")
  return lora, config_io.from_saved(meta["config"], f"{step} (its saved config)")


def check(spec: str):
  """What `load` would refuse, found without loading weights: `eval --compare` checks every model first."""
  path = Path(spec)
  step = checkpoint.find_step(path) if path.is_dir() else None
  if step is None:
    check_plain(spec)
    return
  _, run_cfg = _saved_lora(step)
  check_plain(run_cfg.model.spec)
  if (init := _init_run(spec)) != "base":
    runs.info(Path(init))


def check_top_k(sampling, section: str, model: models.Model):
  """A top_k beyond the vocabulary (the sampler's top-k would fail on it)."""
  vocab = model.cfg.vocab_size
  if sampling.top_k > vocab:
    raise UserError(f"{section}.top_k={sampling.top_k} exceeds the vocabulary of {model.name} ({vocab} tokens): "
                    f"set it <= {vocab}, or 0 for no top-k")


def place(policy: Policy, mesh, dtype: str = "float32") -> tuple[Any, Any]:
  """(params in `dtype`, lora) as device arrays sharded by the one table in sharding.py."""
  cfg = policy.model.cfg
  params = models.place_params(policy.model.params, cfg, mesh, jnp.dtype(dtype))
  if policy.lora is None:
    return params, None
  return params, sharding_lib.place(policy.lora, sharding_lib.shardings(lora_lib.shapes(cfg, policy.lora_cfg), mesh))


def decode_weights(policy: Policy, mesh, dtype: str = "float32", mode: str = "auto") -> layout.Weights:
  """What eval and chat generate with: the policy's merged decode copy (`sampling.layout`), built from the weights
  placed in the training layout (each device is handed only its own block), or those when `mode` says train."""
  params, lora = place(policy, mesh, dtype)
  weights, note = layout.build(params, lora, policy.model.cfg, mesh, lora_scale=policy.lora_scale, dtype=dtype,
                               mode=mode)
  if note:
    print(note, file=sys.stderr)
  return weights
