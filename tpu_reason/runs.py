"""Run directories: which trainer wrote them, the latest finished SFT run, and their adapters.

A run dir holds `run.json` ({"trainer": "sft" | "grpo", "init": ...}), `config.yaml`,
`checkpoints/{last,best}` and, once finished, `summary.json`. A GRPO run trains a fresh
adapter on top of the base weights with its `init` run's adapter merged in, so loading a
policy follows that chain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tpu_reason import checkpoint, config, lora as lora_lib
from tpu_reason.config import Config
from tpu_reason.errors import UserError

RUNS = Path("runs")
BEST = {"sft": ("eval_loss", "min"), "grpo": ("reward", "max")}  # how each trainer ranks checkpoints/best


def write_info(out: Path, trainer: str, init: str = "base"):
  out.mkdir(parents=True, exist_ok=True)
  (out / "run.json").write_text(json.dumps({"trainer": trainer, "init": init}))


def info(run_dir: Path) -> dict:
  path = Path(run_dir) / "run.json"
  if not path.exists():
    raise UserError(f"{run_dir} is not a tpu_reason run directory (no run.json)")
  return json.loads(path.read_text())


def read_config(run_dir: Path) -> Config:
  return config.load(Config, Path(run_dir) / "config.yaml")


def latest_finished(spec: str, trainer: str = "sft", root: Path = RUNS) -> Path | None:
  """Newest run under `root` by `trainer` on model `spec` that wrote its summary."""
  found = []
  for summary in Path(root).glob("*/summary.json"):
    run = summary.parent
    try:
      if info(run)["trainer"] == trainer and read_config(run).model.spec == spec:
        found.append((summary.stat().st_mtime, run))
    except (UserError, OSError, KeyError, ValueError):
      continue  # a foreign or half-written directory is not a candidate
  return max(found)[1] if found else None


def load_lora(run_dir: Path, which: str = "best") -> tuple[Any, float, int]:
  """(adapters, their scale, step) from a run's best checkpoint (else its latest), or its latest."""
  root = Path(run_dir) / "checkpoints"
  step_dir = checkpoint.find_step(root if which == "best" else root / "last")
  if step_dir is None:
    raise UserError(f"{run_dir} has no checkpoint yet")
  lora, _ = checkpoint.restore_lora(step_dir)
  return lora, lora_lib.scale(read_config(run_dir).lora), int(step_dir.name)


def apply_init(init: str, params, new_tokens: tuple[int, ...] = ()):
  """Weights with the adapter chain of run `init` merged in ("base": unchanged); `new_tokens`: the
  model's added token ids (`ModelConfig.new_tokens`), whose trained rows the adapters carry."""
  if init == "base":
    return params
  run = Path(init)
  params = apply_init(info(run).get("init", "base"), params, new_tokens)
  lora, scale, _ = load_lora(run)
  return lora_lib.merge(params, lora, scale, new_tokens)


def check_tokens(init: str, add_tokens: tuple[str, ...]):
  """A run on top of `init` adds the same tokens as it, if it added any: its trained rows belong to those ids."""
  theirs = () if init == "base" else read_config(Path(init)).model.add_tokens
  if theirs and tuple(theirs) != tuple(add_tokens):
    raise UserError(f"the init run {init} trained model.add_tokens={list(theirs)}: set the same, "
                    f"got {list(add_tokens)}")


def base_params(run_dir: Path, params, new_tokens: tuple[int, ...] = ()):
  """The weights a run's own adapter applies to: base, plus its init run's merged adapter(s)."""
  return apply_init(info(run_dir).get("init", "base"), params, new_tokens)
