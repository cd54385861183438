"""`python -m tpu_reason.eval --model SPEC_OR_RUN_DIR [--data FILE.jsonl] [key=value ...]`: score a model.

The model is a spec (`smollm2-135m`, a GGUF, a Hugging Face dir) or a training run /
checkpoint directory (base model from its config, LoRA from its best, else latest,
checkpoint; the run's config.yaml is then the recipe, so prompts use the schema and system
prompt it trained on). Rows come from `--data FILE` (JSONL or parquet, read whole; its
layout is recognised from its first row: GSM8K `question` / `answer` with `#### N`, the
teacher format, s1K, dolphin-r1, else a table of `question` or `prompt`, `answer`, optional
`checkpoints`; `data.source=...` overrides) or, without it, from the held-out split the
trainers hold out of `data.*` (reasoning-gym `data.task` at `data.eval_seed`; a file's last
`data.eval_size` rows), minus any row whose id or normalised question is a training row's.
`eval.limit` keeps the first N rows.

Greedy by default; `eval.k=4 sampling.temperature=0.7` draws 4 samples per prompt (the
prompt is prefilled once) for pass@k and maj@k. With `budget.max_thinking_tokens` or
`budget.extend` set, every model runs twice, plain and budget-forced, so the cost and gain
of forcing show side by side. `--compare A B [C ...]` evaluates every model on the same rows
in one run and prints one table. `redact_thoughts=true` writes reasoning as its length only.

Writes to `output_dir` (default runs/eval-<time>): config.yaml, eval.json (metrics; the
forced run under "forced") and samples.jsonl (every prompt, completion, parsed answer and
reward); with --compare, one such pair per model in <output_dir>/<label>/ and compare.json.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from tpu_reason import config_io, mesh as mesh_lib, policy, runs, tags
from tpu_reason import scoring
from tpu_reason.config import Config, DataCfg
from tpu_reason.data.prepare import load_records, split_records
from tpu_reason.data.sources import file_kind
from tpu_reason.errors import UserError, cli
from tpu_reason.sampling import budget as budget_lib

FLAGS = {"--model": "model", "--compare": "compare", "--data": "data", "--out": "output_dir", "--k": "eval.k",
         "--limit": "eval.limit", "--max-new-tokens": "sampling.max_new_tokens",
         "--temperature": "sampling.temperature", "--seed": "sampling.seed"}
# Table rows, in order; anything else a run reports (budget counters) follows.
ROWS = ("n", "k", "accuracy", "format_accuracy", "pass@k", "maj@k", "reward/format", "reward/format_soft",
        "reward/process", "reward/outcome", "mean_completion_tokens", "unclosed_rate")


def _flag_value(argv: list[str], i: int) -> tuple[str, int]:
  """Value of the flag at argv[i] (`--f=v` or `--f v`) and the index after it."""
  if "=" in argv[i]:
    return argv[i].split("=", 1)[1], i + 1
  if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
    raise UserError(f"{argv[i]} needs a value")
  return argv[i + 1], i + 2


def _models(args: list[str]) -> list[str]:
  """The model specs at the head of args: up to the next flag or key=value override."""
  return list(itertools.takewhile(lambda a: not a.startswith("--") and "=" not in a, args))


def split_args(argv: list[str]) -> tuple[list[str], list[str], bool]:
  """(config argv, model specs, whether --data names the rows): pulls out --model X, --compare A B ...

  --out becomes output_dir; --data FILE becomes data.path, and data.source the layout of the
  file's first row unless data.source is given.
  """
  rest, specs, given, data_file, i = [], [], [], False, 0
  chosen_source = any(a.removeprefix("--").startswith("data.source=") for a in argv)
  while i < len(argv):
    name = argv[i].split("=", 1)[0]
    if name == "--compare":
      models = _models(argv[i + 1:])
      if len(models) < 2:
        raise UserError("--compare needs two or more models: --compare A B [C ...]")
      if twice := sorted({m for m in models if models.count(m) > 1}):
        raise UserError(f"--compare names {', '.join(twice)} more than once: each model is evaluated once")
      specs += models
      i += 1 + len(models)
    elif name == "--model":
      spec, i = _flag_value(argv, i)
      specs.append(spec)
    elif name == "--out":
      path, i = _flag_value(argv, i)
      rest.append(f"output_dir={path}")
    elif name == "--data":
      path, i = _flag_value(argv, i)
      rest += [f"data.path={path}"] + ([] if chosen_source else [f"data.source={file_kind(path)}"])
      data_file = True
    else:
      rest.append(argv[i])
      i += 1
    given += [name] if name in ("--model", "--compare") else []
  if len(given) > 1:
    raise UserError("give one model (--model X) or several (--compare A B ...), once")
  return rest, specs, data_file


def eval_records(data: DataCfg, limit: int = 0, data_file: bool = False) -> list:
  """The rows to evaluate (first `limit`): a --data file whole, else the held-out split the trainers leave out."""
  if data_file:
    records, report = load_records(data, seed=data.seed, size=data.size)
    where = str(report)
  else:
    splits = split_records(data)
    records = splits.eval
    where = f"held-out split of {splits.eval_source}: {len(records)} rows (dropped: {splits.eval_dropped})"
  print(where)
  if not records:
    raise UserError(f"no rows to evaluate: {where}; set data.eval_size or give --data FILE")
  return records[:limit] if limit else records


def labels(specs: list[str]) -> list[str]:
  """Short distinct names for the models (run or file name), usable as directory names."""
  out = []
  for spec in specs:
    run = policy.run_dir(spec)
    name = (run or Path(spec.rstrip("/"))).name or spec
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    out.append(name if name not in out else f"{name}-{len(out) + 1}")
  return out


def _rows(columns: dict[str, dict]) -> list[tuple[str, list[str]]]:
  """(metric label, a cell per column): ROWS in order, then any other numeric metric (budget counters)."""
  numbers = {k for m in columns.values() for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
  keys = [k for k in ROWS if k in numbers]
  keys += sorted(numbers - set(keys) - {"seconds", "tokens_per_second"})
  k = next(iter(columns.values())).get("k", 1)
  return [(key.replace("@k", f"@{k}"), [_cell(key, m.get(key)) for m in columns.values()]) for key in keys]


def table(columns: dict[str, dict]) -> str:
  """One text table: a column per (model, setting), a row per metric."""
  width = max(12, *(len(c) + 2 for c in columns))
  lines = [f"{'':<24}" + "".join(f"{c:>{width}}" for c in columns)]
  lines += [f"{label:<24}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in _rows(columns)]
  return "\n".join(lines)


def markdown_table(columns: dict[str, dict]) -> str:
  """The same table in Markdown (the notebook's results)."""
  lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in _rows(columns)]
  return "\n".join(lines)


def _cell(key: str, v) -> str:
  if v is None:
    return "-"
  if isinstance(v, int):
    return f"{v:d}"
  return f"{v:.1f}" if "tokens" in key else f"{v:.3f}"


def _show(samples: list[dict], n: int, title: str):
  for s in samples[:n]:
    print(f"--- {title} | {s['id']} gold={s['gold']!r} parsed={s['answer']!r} scores={s['scores']}")
    print(s["completion"])


def _write(out: Path, result: dict, samples: list[dict]):
  out.mkdir(parents=True, exist_ok=True)
  (out / "eval.json").write_text(json.dumps(result, indent=1))
  with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
    for s in samples:
      f.write(json.dumps(s, ensure_ascii=False) + "\n")


def evaluate_model(cfg: Config, spec: str, name: str, records: list, mesh) -> tuple[dict, list[dict], dict]:
  """(eval.json content, samples, {column: metrics}) of one model, plain and (if set) budget-forced."""
  schema = tags.get_schema(cfg.data.schema)
  pol = policy.load(spec, cfg.model.dtype)
  policy.check_top_k(cfg.sampling, "sampling", pol.model)
  w = policy.decode_weights(pol, mesh, cfg.model.dtype, cfg.mesh.decode_layout)
  examples = scoring.prompt_examples(records, pol.model, schema, cfg.data.system_prompt)
  result, all_samples, columns = {"model": spec, "source": pol.source}, [], {}
  settings = {"": None, budget_lib.label(cfg.budget): cfg.budget} if budget_lib.active(cfg.budget) else {"": None}
  for suffix, budget in settings.items():
    with jax.set_mesh(mesh):  # each chip decodes its own rows
      metrics, samples = scoring.evaluate(
          pol.model, w.params, examples, schema, sampling=cfg.sampling, k=cfg.eval.k, lora=w.lora,
          lora_scale=w.lora_scale, budget=budget, batch_size=cfg.eval.batch_size,
          dtype=jnp.dtype(cfg.model.dtype), redact=cfg.redact_thoughts, desc=name + suffix)
    setting = "forced" if budget else "plain"
    all_samples += [{"setting": setting, **s} for s in samples]
    columns[name + suffix] = metrics
    if budget:
      result["forced"] = {**metrics, "budget": dataclasses.asdict(budget)}
    else:
      result.update(metrics)
    _show(samples, cfg.eval.show, f"{name} {setting}")
  return result, all_samples, columns


def run(cfg: Config, specs: list[str], data_file: bool = False) -> dict[str, dict]:
  """Evaluate each model on the same rows; write eval.json + samples.jsonl per model; print one table.

  The rows are the held-out split of `cfg.data`, or all of `data.path` with `data_file` (--data).
  """
  if cfg.eval.k > 1 and cfg.sampling.temperature == 0:
    raise UserError(f"eval.k={cfg.eval.k} samples of greedy decoding are identical: set sampling.temperature > 0")
  out = cfg.resolved_output_dir("eval", named=False)
  runs.check_output(out, "output_dir (--out)", ("eval.json", "compare.json"))
  if len(specs) > 1:  # every model checked before the first is evaluated and written
    for spec in specs:
      policy.check(spec)
  records = eval_records(cfg.data, cfg.eval.limit, data_file)  # before any model loads: bad data fails fast
  mesh = mesh_lib.make_mesh(cfg.mesh)
  results, columns = {}, {}
  for name, spec in zip(labels(specs), specs):
    result, samples, cols = evaluate_model(cfg, spec, name, records, mesh)
    config_io.save(cfg, out)  # only once there is a result: a failed eval leaves no directory
    _write(out / name if len(specs) > 1 else out, result, samples)
    results[name] = result
    columns.update(cols)
  text = table(columns)
  if len(specs) > 1:
    (out / "compare.json").write_text(json.dumps({"models": results, "table": text}, indent=1))
  print(text)
  print(f"outputs in {out}")
  return results


@cli
def main(argv: list[str] | None = None):
  argv, specs, data_file = split_args(sys.argv[1:] if argv is None else argv)
  cfg, _ = config_io.parse_args(Config, policy.with_run_config(argv, specs), FLAGS)
  run(cfg, specs or [cfg.model.spec], data_file)


if __name__ == "__main__":
  main()
