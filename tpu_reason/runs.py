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

import jax

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


def load_lora(run_dir: Path, model_cfg, which: str = "best") -> tuple[Any, float, int]:
  """(adapters, their scale, step) from a run's best checkpoint (else its latest)."""
  from tpu_reason.train import init_state, make_optimizer

  cfg = read_config(run_dir)
  optimizer = make_optimizer(cfg.train)
  abstract = jax.eval_shape(lambda: init_state(lora_lib.init(model_cfg, cfg.lora, jax.random.key(0)), optimizer, 0))
  metric, mode = BEST[info(run_dir)["trainer"]]
  ckpts = checkpoint.Checkpoints(Path(run_dir) / "checkpoints", cfg.train.keep_last, best_metric=metric, best_mode=mode)
  try:
    step = (ckpts.best_step() if which == "best" else None) or ckpts.latest_step()
    if step is None:
      raise UserError(f"{run_dir} has no checkpoint yet")
    source = "best" if which == "best" and ckpts.best_step() == step else "last"
    state, _ = ckpts.restore(step, abstract, which=source)
  finally:
    ckpts.close()
  return state.lora, lora_lib.scale(cfg.lora), step


def apply_init(init: str, params, model_cfg):
  """Weights with the adapter chain of run `init` merged in ("base": unchanged)."""
  if init == "base":
    return params
  run = Path(init)
  params = apply_init(info(run).get("init", "base"), params, model_cfg)
  lora, scale, _ = load_lora(run, model_cfg)
  return lora_lib.merge(params, lora, scale)


def base_params(run_dir: Path, params, model_cfg):
  """The weights a run's own adapter applies to: base, plus its init run's merged adapter(s)."""
  return apply_init(info(run_dir).get("init", "base"), params, model_cfg)
