"""Run directories: which trainer wrote them, the latest finished SFT run, and their adapters.

A run dir holds `run.json` ({"trainer": "sft" | "grpo", "init": ...}), `config.yaml`,
`checkpoints/{last,best}` and, once finished, `summary.json`. A GRPO run trains a fresh
adapter on top of the base weights with its `init` run's adapter merged in, so loading a
policy follows that chain.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tpu_reason import checkpoint, config, config_io, lora as lora_lib
from tpu_reason.config import Config
from tpu_reason.errors import UserError, first_line

RUNS = Path("runs")
KIND = {"sft": "an SFT", "grpo": "a GRPO"}
BEST = {"sft": ("eval_loss", "min"), "grpo": ("reward", "max")}  # how each trainer ranks checkpoints/best


def write_info(out: Path, trainer: str, init: str = "base"):
  out.mkdir(parents=True, exist_ok=True)
  (out / "run.json").write_text(json.dumps({"trainer": trainer, "init": init}))


def info(run_dir: Path) -> dict:
  path = Path(run_dir) / "run.json"
  if not path.exists():
    raise UserError(f"{run_dir} is not a tpu_reason run directory (no run.json)")
  try:
    found = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: unreadable ({first_line(e)})") from None
  if not isinstance(found, dict) or found.get("trainer") not in BEST:
    raise UserError(f"{path}: not a run.json of tpu_reason (no trainer sft or grpo)")
  return found


def read_config(run_dir: Path) -> Config:
  """The run's saved config.yaml, keys moved since it was saved read at their new place."""
  path = Path(run_dir) / "config.yaml"
  if not path.is_file():
    raise UserError(f"{run_dir} has no config.yaml: not a finished tpu_reason run directory")
  return config_io.load(Config, path)


def summary(run_dir: Path) -> dict:
  """The run's summary.json ({} when it has none yet, or it cannot be read)."""
  try:
    found = json.loads((Path(run_dir) / "summary.json").read_text())
  except (OSError, ValueError, UnicodeDecodeError):
    return {}
  return found if isinstance(found, dict) else {}


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
    raise UserError(f"{run_dir}: a training run with no completed checkpoint (under {root})")
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


def check_init(init: str, model: config.ModelCfg):
  """The init run trained this model, with the same added tokens: its adapter merges into these weights."""
  theirs = "base" if init == "base" else read_config(Path(init)).model.spec
  if theirs not in ("base", model.spec):
    raise UserError(f"the init run {init} trained model.spec={theirs}, not {model.spec}: its adapter does not fit "
                    "this model")
  check_tokens(init, model.add_tokens)
  if init != "base":  # its adapter reads (a deleted or damaged checkpoint is refused before the model loads)
    root = Path(init) / "checkpoints"
    step_dir = checkpoint.find_step(root)
    if step_dir is None:
      raise UserError(f"{init}: a training run with no completed checkpoint (under {root})")
    checkpoint.lora_metadata(step_dir)


def check_tokens(init: str, add_tokens: tuple[str, ...]):
  """A run on top of `init` adds the same tokens as it, if it added any: its trained rows belong to those ids."""
  theirs = () if init == "base" else read_config(Path(init)).model.add_tokens
  if theirs and tuple(theirs) != tuple(add_tokens):
    raise UserError(f"the init run {init} trained model.add_tokens={list(theirs)}: set the same, "
                    f"got {list(add_tokens)}")


def base_params(run_dir: Path, params, new_tokens: tuple[int, ...] = ()):
  """The weights a run's own adapter applies to: base, plus its init run's merged adapter(s)."""
  return apply_init(info(run_dir).get("init", "base"), params, new_tokens)


# What a run is: another model, other added tokens or other LoRA shapes / scale make its checkpoints foreign.
IDENTITY = ("model.spec", "model.add_tokens", "lora.rank", "lora.alpha", "lora.targets")
# What a resume may change: where and how long it runs, the layout of the same computation, and the sections
# its trainer never reads. Anything else would make config.yaml describe steps that were trained otherwise.
RESUMABLE = ("name", "output_dir", "redact_thoughts", "train.resume", "train.max_minutes", "train.max_nonfinite",
             "train.keep_last", "train.save_every", "grpo.save_every", "mesh.", "model.remat", "sampling.", "eval.",
             "budget.", "curate.", "distill.")
UNREAD = {"sft": ("grpo.",),
          "grpo": ("train.max_steps", "train.batch_size", "train.grad_accum", "train.optim.", "train.eval_every")}


def check_creatable(out: Path, what: str):
  """A directory that does not exist yet can be made there: its nearest existing parent is a folder this process
  can write (tried with an empty folder made and removed at once), else one line before anything is done."""
  parent = next((p for p in Path(out).absolute().parents if p.exists()), None)
  if parent is None or not parent.is_dir():
    raise UserError(f"{what}: {parent} is a file, not a directory")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".tpu_reason-check-", dir=parent))
  except OSError as e:
    raise UserError(f"{what}: cannot create it under {parent} ({first_line(e)})") from None


def check_output(out: Path, flag: str, markers: tuple[str, ...]):
  """`out` is new, empty, or an earlier output of this command (it holds one of `markers`): never a training run,
  and never a directory of other files (eval / export would overwrite theirs)."""
  out = Path(out)
  if out.exists() and not out.is_dir():
    raise UserError(f"{flag} {out} is a file: give a directory")
  if not out.exists():
    return check_creatable(out, f"{flag} {out}")
  if not any(out.iterdir()):
    return
  if (out / "run.json").exists():
    raise UserError(f"{flag} {out} is a training run directory: give a new directory (a run is written only by its "
                    "trainer)")
  if not any((out / m).exists() for m in markers):
    raise UserError(f"{flag} {out} already holds files this command did not write: give a new or empty directory")


def _flat(cfg: Config) -> dict:
  return config_io.flatten(config_io.to_dict(cfg))


def _settings(flat: dict, keys: list[str]) -> str:
  return " ".join(f"{k}={flat[k]!r}" if isinstance(flat[k], str) else f"{k}={flat[k]}" for k in keys)


def check_output_dir(out: Path, cfg: Config, kind: str):
  """Refuse, before anything is written, an `output_dir` this `kind` run must not write into: a file, a
  directory that is not a run, a run of another trainer, model or LoRA shape, or a resume with changed settings."""
  out = Path(out)
  if out.exists() and not out.is_dir():
    raise UserError(f"output_dir={out} is a file: give a directory")
  if not out.exists():
    return check_creatable(out, f"output_dir={out}")
  if not any(out.iterdir()):
    return
  if not (out / "run.json").exists():
    raise UserError(f"output_dir={out} holds files but no run.json (not a tpu_reason run): give a new or empty "
                    "directory")
  theirs = info(out)["trainer"]
  if theirs != kind:
    raise UserError(f"output_dir={out} is {KIND[theirs]} run: {KIND[kind]} run needs its own output_dir")
  saved, ours = _flat(read_config(out)), _flat(cfg)
  differ = [k for k in IDENTITY if saved[k] != ours[k]]
  if differ:
    raise UserError(f"output_dir={out} is a run of {_settings(saved, differ)}, not {_settings(ours, differ)}: "
                    "a new run needs its own output_dir")
  if cfg.train.resume != "none" and checkpoint.any_saved(out):
    check_resume(out, saved, ours, kind)
  elif cfg.train.resume != "none" and (out / "summary.json").exists():
    raise UserError(f"output_dir={out} is a finished run with no completed checkpoint left (under {out / 'checkpoints'}):"
                    " give a new output_dir, or train.resume=none to train it afresh there")


def check_resume(out: Path, saved: dict, ours: dict, kind: str):
  """A resume keeps the settings the run's steps were trained with (those of RESUMABLE / UNREAD may change)."""
  if kind == "grpo" and ours["grpo.init"] == "auto":
    ours = {**ours, "grpo.init": saved["grpo.init"]}  # a resume keeps its init run (run.json), whatever auto finds
  elif kind == "grpo" and ours["grpo.init"] != "base":
    ours = {**ours, "grpo.init": str(Path(ours["grpo.init"]).resolve())}
  free = RESUMABLE + UNREAD[kind]
  changed = [k for k in ours if saved.get(k) != ours[k] and not k.startswith(free)]
  if changed:
    raise UserError(f"output_dir={out} resumes a run trained with {_settings(saved, changed[:3])}; this command "
                    f"sets {_settings(ours, changed[:3])}: keep the run's settings or give a new output_dir (a "
                    "resume may change only where and how long it runs: train.max_minutes, train.keep_last, mesh.*, "
                    "...)")
