"""`python -m tpu_reason.grpo [--config recipes/X.yaml] [key=value ...]`: GRPO on LoRA adapters.

`build` resolves the init weights (`grpo.init`), loads the model and the prompts, makes the mesh and the jitted
functions, and hands `loop.run` a `Trainer`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from tpu_reason import config_io, lora as lora_lib, loop, mesh as mesh_lib, models, runs, tags
from tpu_reason.config import Config, DataCfg
from tpu_reason.data import prepare
from tpu_reason.data.prepare import prepare_prompts, split_records
from tpu_reason.errors import UserError, cli
from tpu_reason.grpo.trainer import TASK_METRICS, Trainer, jitted, task_metrics


def resolve_init(cfg: Config) -> str:
  """grpo.init -> "base" or an absolute run dir (auto: the latest finished SFT run of this model)."""
  init = cfg.grpo.init
  if init == "base":
    return "base"
  if init == "auto":
    found = runs.latest_finished(cfg.model.spec, "sft")
    if found is None:
      print(f"note: no finished SFT run of {cfg.model.spec} under {runs.RUNS}/; starting GRPO from the base model "
            "(run `python -m tpu_reason.sft` first for a model that already writes the tags)")
      return "base"
    print(f"starting from the SFT run {found}")
    return str(found.resolve())
  path = Path(init)
  runs.info(path)  # a clear error when it is not a run dir
  return str(path.resolve())


def prompt_data(cfg: Config) -> DataCfg:
  """The data settings of the run's prompts: `data` with grpo.task, when set, as the task."""
  return dataclasses.replace(cfg.data, task=cfg.grpo.task) if cfg.grpo.task else cfg.data


def task_name(data: DataCfg) -> str:
  """What a held-out set is called: its reasoning-gym task, or its file's name."""
  return data.task if data.source in prepare.GENERATED_SOURCES else Path(data.path).name


def load_prompts(cfg: Config, model) -> tuple[list, list, list]:
  """(train, curriculum, eval) prompt examples; reports printed."""
  data = prompt_data(cfg)
  train, evals, reports = prepare_prompts(data, model)
  warmup = []
  for task in cfg.grpo.curriculum:
    data = dataclasses.replace(cfg.data, task=task, source="reasoning_gym", eval_size=0)
    rows, _, rep = prepare_prompts(data, model, split_records(data))
    warmup += rows
    reports[f"curriculum:{task}"] = rep["train"]
  for r in reports.values():
    print(r.summary())
  return train, warmup, evals


def eval_task_prompts(cfg: Config, init: str, model) -> dict[str, list]:
  """Held-out prompts of each of grpo.eval_tasks, by task name: "init" is the task of the run GRPO starts from
  (an SFT run's: the held-out rows it scored, drawn as it drew them; none from the base), the others
  reasoning-gym tasks drawn like this run's own held-out rows. A task the run already scores is skipped."""
  own = task_name(prompt_data(cfg))
  tasks = {}
  for task in cfg.grpo.eval_tasks if cfg.data.eval_size else ():
    if task == "init":
      if init == "base":
        continue
      data = runs.read_config(Path(init)).data
    else:
      data = dataclasses.replace(cfg.data, task=task, source="reasoning_gym")
    name = task_name(data)
    if name in (own, *tasks):
      continue
    from_sft = task == "init" and runs.info(Path(init))["trainer"] == "sft"
    tasks[name], report = (prepare.held_out_examples if from_sft else prepare.held_out_prompts)(data, model)
    print(f"{name}: {report.summary()}")
  return tasks


# What a held-out eval's scores depend on beside the rows and the adapters: equal in an SFT run's config and
# this run's, its "after" scores are what this run's "before" would generate on the same rows
SCORED_ALIKE = ("train.eval_generate", "train.eval_max_new_tokens", "model.dtype", "model.quant", "mesh.decode_layout",
                "data.schema")


def init_before(cfg: Config, init: str, tasks: dict[str, list]) -> dict[str, dict]:
  """The "before" scores of the init task taken from the SFT run's summary.json, by task name, instead of
  generated again (minutes of greedy decoding): its "after" eval scored the same rows (`eval_task_prompts`)
  with the adapters GRPO merged (its last step is its best) and the same generation settings. Empty (generate)
  when anything differs."""
  if init == "base" or runs.info(Path(init))["trainer"] != "sft":
    return {}
  sft_cfg, summary = runs.read_config(Path(init)), runs.summary(Path(init))
  name, after = task_name(sft_cfg.data), summary.get("after", {})
  setting = lambda c, key: functools.reduce(getattr, key.split("."), c)  # noqa: E731
  rows, metrics = min(cfg.train.eval_generate, len(tasks.get(name, ()))), task_metrics(after)
  alike = (all(setting(sft_cfg, key) == setting(cfg, key) for key in SCORED_ALIKE) and name in tasks
           and summary.get("finished") and summary.get("best_step") == summary.get("last_step")
           and after.get("rows") == rows and len(metrics) == len(TASK_METRICS))
  if not alike:
    return {}
  print(f"{name}: before = the SFT run's after on the same {rows} rows (its summary.json)")
  return {name: {**metrics, "rows": rows}}


def build(cfg: Config) -> Trainer:
  """Load model (with the init adapter merged), prompts, mesh and the jitted functions."""
  g = cfg.grpo
  out = cfg.resolved_output_dir("grpo")
  schema = tags.get_schema(cfg.data.schema)
  # a resumed run keeps the weights it started from, whatever `auto` would pick today
  resuming = (out / "run.json").exists() and cfg.train.resume != "none"
  init = runs.info(out).get("init", "base") if resuming else resolve_init(cfg)
  runs.check_init(init, cfg.model)
  if cfg.grpo.task and cfg.data.source in prepare.GENERATED_SOURCES:  # the prompts' tasks, named by the key that set them, before the model loads
    prepare.check_task(cfg.grpo.task, "grpo.task")
  for task in cfg.grpo.curriculum:
    prepare.check_task(task, "grpo.curriculum")
  for task in set(cfg.grpo.eval_tasks) - {"init"}:
    prepare.check_task(task, "grpo.eval_tasks")
  model = models.load_for(cfg.model)
  train, warmup, evals = load_prompts(cfg, model)
  tasks = eval_task_prompts(cfg, init, model)
  if len(train) < g.prompts:
    raise UserError(f"only {len(train)} training prompts survived filtering; need >= grpo.prompts={g.prompts}")
  mesh = mesh_lib.make_mesh(cfg.mesh)
  if (g.micro_batch * g.group) % mesh.shape["fsdp"]:
    raise UserError(f"grpo.micro_batch * grpo.group = {g.micro_batch * g.group} rows must be a multiple of the "
                    f"fsdp mesh size {mesh.shape['fsdp']} ({jax.device_count()} devices)")
  dtype = jnp.dtype(cfg.model.dtype)
  params = runs.apply_init(init, model.params, model.cfg.new_tokens)
  params = models.place_params(params, model.cfg, mesh, dtype)
  model.params = None  # one copy of the weights: the policy and the reference both read `params`
  optimizer, step_fn, logp_fn, state_sh = jitted(model.cfg, cfg, mesh)
  cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(g, init=init))  # config.yaml names the resolved init
  return Trainer(cfg, out, model, schema, train, warmup, evals, params, mesh, optimizer, step_fn, logp_fn,
                 lora_lib.scale(cfg.lora), state_sh, init, tasks=tasks, known_before=init_before(cfg, init, tasks))


def run(cfg: Config) -> dict:
  """Train with GRPO, evaluate before/after, checkpoint; returns the summary (also summary.json)."""
  return loop.run(cfg, build, "grpo")


@cli
def main(argv: list[str] | None = None):
  cfg, _ = config_io.parse_args(Config, sys.argv[1:] if argv is None else argv)
  run(cfg)
