"""`plan --tpu v5e-8`: libtpu's compiler builds, for compile-only chips of that slice, every program a run
executes (`lowering.lower_all`); its buffer assignment is each program's real per-chip HBM, beside the
analytical plan's phase, and its HLO, loop-weighted (`hlo_cost`), gives each program's time on paper.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from tpu_reason import config, grpo, hlo_cost, lora as lora_lib, mesh as mesh_lib, models, train as train_lib
from tpu_reason.config import Config
from tpu_reason.errors import UserError
from tpu_reason.models.transformer import ModelConfig, param_dtypes, param_shapes
from tpu_reason.plan.analytical import GIB, Plan, check_mesh, local_tree, nbytes, plan, table
from tpu_reason.plan.lowering import lower_all, stand_in, xla_bytes

V5E_HBM_GIB = 15.75  # of a v5e chip's 16 GiB, what libtpu's compiler lets programs use (it reserves the rest)
# --tpu name -> (libtpu topology, chips per host): compile-only chips of one v5e host
TPUS = {"v5e-1": ("v5e:1x1", (1, 1, 1)), "v5e-4": ("v5e:2x2", (2, 2, 1)), "v5e-8": ("v5e:2x4", (2, 2, 1))}


# --------------------------------------------------------------------------- the TPU compiler

DECODE_LOOP = hlo_cost.DECODE_LOOP  # its trip count is data dependent: a run's max_new_tokens at most
# each program beside the analytical phase that covers it (the log-prob pass has none)
PLAN_PHASE = {"SFT step": "SFT step", "GRPO merge": "GRPO rollout", "GRPO prefill": "GRPO rollout",
              "GRPO decode": "GRPO rollout", "GRPO update": "GRPO train"}
# `--programs` names each program by one word (the SFT step's compile takes about a third of the whole)
PROGRAM_KEYS = {"sft": "SFT step", "merge": "GRPO merge", "prefill": "GRPO prefill", "decode": "GRPO decode",
                "log-probs": "GRPO log-probs", "update": "GRPO update"}


def chosen_programs(keys: str | None) -> tuple[str, ...] | None:
  """`--programs sft,decode` -> the programs' names (None: every program); an unknown key is a UserError."""
  if keys is None:
    return None
  asked = [k.strip() for k in keys.split(",") if k.strip()]
  unknown = [k for k in asked if k not in PROGRAM_KEYS]
  if unknown or not asked:
    raise UserError(f"--programs takes a comma-separated list of {', '.join(PROGRAM_KEYS)}, got {keys!r}")
  return tuple(PROGRAM_KEYS[k] for k in asked)


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One program as libtpu's compiler built it for one chip, or its reason for refusing."""

  name: str
  sizes: dict[str, int]  # `xla_bytes`; empty when refused
  all_gathers: int
  seconds: float
  refused: str = ""  # the compiler's one-line reason
  log: str = ""  # where libtpu wrote its buffer list, when refused
  cost: hlo_cost.Cost | None = None  # per chip, every loop at its trip count (`hlo_cost`)
  token: hlo_cost.Cost | None = None  # one iteration of the decode loop: one generated token (decode only)
  xla_flops: float = 0.0  # the compiler's own cost analysis: loop bodies counted once, for comparison

  def fits(self, hbm: int) -> bool:
    return not self.refused and self.sizes["total"] <= hbm


def tpu_devices(name: str) -> list:
  """Compile-only chips of a TPU slice: libtpu's compiler runs on this host, nothing executes."""
  if name not in TPUS:
    raise UserError(f"--tpu must be one of {', '.join(TPUS)}, got {name!r}")
  if importlib.util.find_spec("libtpu") is None:
    raise UserError('--tpu needs the TPU compiler (libtpu): pip install "tpu_reason[tpu]"')
  topology, host = TPUS[name]
  try:
    return topologies.get_topology_desc(topology, "tpu", chips_per_host_bounds=list(host)).devices
  except jax.errors.JaxRuntimeError as e:
    if "lockfile" not in str(e):
      raise
    # libtpu admits one process a host, and any jax process (a CPU run too) takes it when libtpu is installed
    raise UserError("--tpu: another process holds libtpu (/tmp/libtpu_lockfile; any running jax program "
                    "takes it): wait for it to end, or run with ALLOW_MULTIPLE_LIBTPU_LOAD=1") from None


def all_gathers(hlo: str) -> int:
  """All-gather ops (synchronous, or the start of an async one) in compiled HLO text."""
  return len(re.findall(r"\ball-gather(?:-start)?\(", hlo))


def refusal(message: str) -> str:
  """The compiler's one-line reason from its out-of-memory error, without the status codes."""
  line = message.strip().splitlines()[0]
  return line[line.index("Ran out of memory"):] if "Ran out of memory" in line else line


def tpu_log() -> str:
  """The file libtpu logs this process's errors to (its buffer list among them), else its folder."""
  folder = os.environ.get("TPU_LOG_DIR", "/tmp/tpu_logs")
  logs = sorted(glob.glob(os.path.join(folder, f"*.ERROR.*.{os.getpid()}")), key=os.path.getmtime)
  return logs[-1] if logs else folder


def compile_tpu(name: str, lowered: jax.stages.Lowered, options: dict, trips: dict[str, int] | None = None
                ) -> Compiled:
  """Compile one program for TPU: its per-chip bytes, all-gathers and loop-weighted costs (`trips`: loop
  op_name -> count for loops the HLO cannot count), or the compiler's refusal."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    if not str(e).startswith("RESOURCE_EXHAUSTED"):
      raise
    return Compiled(name, {}, 0, time.perf_counter() - t0, refusal(str(e)), tpu_log())
  text = compiled.as_text()
  module = hlo_cost.parse(text)
  token = hlo_cost.iteration_cost(module, DECODE_LOOP) if hlo_cost.loops(module, DECODE_LOOP) else None
  xla = compiled.cost_analysis() or {}
  return Compiled(name, xla_bytes(compiled), all_gathers(text), time.perf_counter() - t0,
                  cost=hlo_cost.program_cost(module, trips), token=token, xla_flops=float(xla.get("flops", 0.0)))


TPU_HEAD = (f"{'per chip (GiB)':<16}{'arguments':>11}{'outputs':>9}{'temporaries':>13}{'total':>9}{'plan':>9}"
            f"{'all-gathers':>13}  verdict")


def tpu_row(c: Compiled, p: Plan) -> str:
  """One program's line: the compiler's figures beside the plan's total for its phase."""
  if c.refused:
    return f"{c.name:<16}  NO FIT: {c.refused} ({c.seconds:.0f} s)\n{'':<16}  libtpu's buffer list: {c.log}"
  b = {k: v / GIB for k, v in c.sizes.items()}
  phase = {ph.name: ph.total / GIB for ph in p.phases}.get(PLAN_PHASE.get(c.name))
  planned = f"{phase:>9.3f}" if phase is not None else f"{'-':>9}"
  return (f"{c.name:<16}{b['arguments']:>11.3f}{b['outputs (not donated)']:>9.3f}{b['temporaries']:>13.3f}"
          f"{b['total']:>9.3f}{planned}{c.all_gathers:>13}  {'FIT' if c.fits(p.hbm) else 'NO FIT'} "
          f"({c.seconds:.0f} s)")


def tpu_notes(cfg: Config, model_cfg: ModelConfig, mesh) -> list[str]:
  """What the compiled programs' shapes are, and what the per-program figures leave out."""
  g, d, t = cfg.grpo, cfg.data, cfg.train
  lora_local = local_tree(lora_lib.shapes(model_cfg, cfg.lora), jnp.float32, mesh)
  adam = nbytes(jax.eval_shape(train_lib.make_optimizer(t.optim, t.max_steps).init, lora_local))
  return [
      f"  SFT step: batch {t.batch_size} (micro-batches of {t.batch_size // t.grad_accum}) x "
      f"({d.max_prompt_tokens}+{d.max_completion_tokens}) tokens",
      f"  GRPO prefill / decode: {g.prompts} prompts of {d.max_prompt_tokens} tokens, then {g.prompts * g.group} "
      f"rows (G={g.group}) of {g.sampling.max_new_tokens} new tokens, rows over fsdp",
      f"  GRPO log-probs: {g.micro_batch * g.group} rows x ({d.max_prompt_tokens}+{g.sampling.max_new_tokens}), "
      "with the "
      "adapters (the old-policy pass; the reference pass is the same without them); no analytical column",
      f"  GRPO update: {g.mini * g.group} rows (micro-batches of {g.micro_batch * g.group}) x "
      f"({d.max_prompt_tokens}+{g.sampling.max_new_tokens}) tokens",
      "  outputs: those not donated to an argument's buffer; plan: the analytical total above for the phase",
      f"  note: prefill, decode and log-probs run while the trainer also holds the Adam moments "
      f"({adam / GIB:.3f} GiB per chip), which are not among those programs' arguments",
  ]


def tpu_verdict(tpu: str, results: list[Compiled], p: Plan) -> tuple[bool, str]:
  """(whether every program fits and the trainers accept the settings, the closing line)."""
  failed = [c.name for c in results if not c.fits(p.hbm)] + list(p.errors)
  built = [c for c in results if not c.refused]
  worst = max(built, key=lambda c: c.sizes["total"]) if built else None
  peak = f", peak {worst.sizes['total'] / GIB:.2f} GiB ({worst.name})" if worst else ""
  verdict = "NO FIT: " + "; ".join(failed) if failed else "FIT"
  return not failed, f"TPU {tpu}: {verdict}{peak} of {p.hbm / GIB:g} GiB per chip"


# --------------------------------------------------------------------------- time on paper

TIME_HEAD = (f"{'per chip':<16}{'GFLOP':>9}{'XLA GFLOP':>11}{'HBM GB':>9}{'coll. MB':>10}{'compute ms':>12}"
             f"{'HBM ms':>9}{'ICI ms':>9}{'roofline ms':>13}")


def ms(seconds: float) -> str:
  return f"{seconds * 1e3:,.2f} ms"


def time_row(c: Compiled) -> str:
  """One program's loop-weighted counts per chip and its roofline time on a v5e chip."""
  if c.cost is None:
    return f"{c.name:<16}  - (refused)"
  r, coll = hlo_cost.roofline(c.cost), sum(c.cost.collective_bytes().values())
  return (f"{c.name:<16}{c.cost.flops / 1e9:>9.2f}{c.xla_flops / 1e9:>11.2f}{c.cost.hbm_bytes / 1e9:>9.2f}"
          f"{coll / 1e6:>10.1f}{r.compute_s * 1e3:>12.2f}{r.hbm_s * 1e3:>9.2f}{r.ici_s * 1e3:>9.2f}"
          f"{r.seconds * 1e3:>13.2f}")


def decode_floor(cfg: Config, model_cfg: ModelConfig, mesh, p: Plan) -> tuple[int, int]:
  """(weights, KV cache) bytes a chip must read per generated token: its tp share of the weights whole over
  fsdp (each chip decodes its own rows) and its rows' KV cache (the plan's), each once. An untied input
  embedding is left out: a token reads one row of it (Qwen2.5-7B: 0.55 GB a chip that no token reads)."""
  tp = mesh.shape["tp"]
  unsplit = mesh_lib.abstract_mesh(config.MeshCfg(fsdp=1, tp=tp), tp)
  read = {k: v for k, v in param_shapes(model_cfg).items() if model_cfg.tie_embeddings or k != "embed"}
  weights = nbytes(local_tree(read, param_dtypes(model_cfg, jnp.dtype(cfg.model.dtype)), unsplit))
  return weights, next(ph.items["KV cache"] for ph in p.phases if ph.name == "GRPO rollout")


def decode_lines(token: hlo_cost.Cost, weights: int, kv: int) -> list[str]:
  """Per generated token per chip: what the collectives move, the roofline, and how far it is off the HBM floor."""
  moved = sorted(token.collective_bytes().items(), key=lambda kv: -kv[1])
  r, floor = hlo_cost.roofline(token), (weights + kv) / hlo_cost.V5E.hbm
  return [f"GRPO decode, per generated token per chip: collectives {sum(b for _, b in moved) / 1e6:,.1f} MB ("
          + ", ".join(f"{k} {b / 1e6:,.1f}" for k, b in moved) + ")",
          f"  roofline {ms(r.seconds)} (compute {ms(r.compute_s)}, HBM {ms(r.hbm_s)}, ICI {ms(r.ici_s)}) against "
          f"an HBM floor of {ms(floor)} (weights {weights / 1e9:.2f} GB + KV cache {kv / 1e9:.2f} GB read once): "
          f"{r.seconds / floor:.1f}x the floor"]


def grpo_calls(g: config.GrpoCfg) -> dict[str, int]:
  """How often one GRPO step runs each program: log-probs per micro-batch for the reference pass (beta > 0) and
  the old-policy pass (more than one update per rollout), the update per mini-batch per iteration."""
  passes = (1 if g.beta else 0) + (grpo.updates_per_step(g) > 1)
  return {"GRPO prefill": 1, "GRPO decode": 1, "GRPO log-probs": passes * (g.prompts // g.micro_batch),
          "GRPO update": grpo.updates_per_step(g)}


def grpo_model_flops(cfg: Config, n_params: int) -> float:
  """A GRPO step's model FLOPs: 2·N per token forward (prefill, decode, log-prob passes), 6·N per token trained."""
  g, prompt, new = cfg.grpo, cfg.data.max_prompt_tokens, cfg.grpo.sampling.max_new_tokens
  calls = grpo_calls(g)
  forward = g.prompts * prompt + g.prompts * g.group * new + calls["GRPO log-probs"] * g.micro_batch * g.group * (
      prompt + new)
  return 2 * n_params * forward + 6 * n_params * calls["GRPO update"] * g.mini * g.group * (prompt + new)


def step_lines(cfg: Config, model_cfg: ModelConfig, seconds: dict[str, float], chips: int) -> list[str]:
  """The SFT and GRPO steps in roofline time and their MFU against the chips' peak."""
  n, d, peak = model_cfg.num_params, cfg.data, hlo_cost.V5E.flops * chips
  lines = []
  if "SFT step" in seconds:
    t, tokens = seconds["SFT step"], cfg.train.batch_size * (d.max_prompt_tokens + d.max_completion_tokens)
    lines.append(f"estimated SFT step: {t:.3f} s ({tokens} tokens), MFU {6 * n * tokens / (t * peak):.1%} "
                 "(model FLOPs 6·N·tokens)")
  calls = grpo_calls(cfg.grpo)
  if "GRPO merge" in seconds:  # the decode copy, built once per rollout
    calls = {"GRPO merge": 1, **calls}
  if all(name in seconds for name in calls):
    parts = {name: k * seconds[name] for name, k in calls.items()}
    total = sum(parts.values())
    lines.append(f"estimated GRPO step: {total:.3f} s = " + " + ".join(
        f"{name.removeprefix('GRPO ')} {calls[name]} x {seconds[name]:.3f}" for name in calls)
        + f", MFU {grpo_model_flops(cfg, n) / (total * peak):.1%} (model FLOPs 2·N per token forward, "
        f"6·N per token trained; decode at its full {cfg.grpo.sampling.max_new_tokens} tokens)")
  return lines


def time_report(cfg: Config, model_cfg: ModelConfig, mesh, p: Plan, results: list[Compiled]) -> list[str]:
  """Time on paper: each program's loop-weighted counts and roofline, the decode per token, the steps."""
  chip = hlo_cost.V5E
  lines = [f"\nTime on paper ({chip.name}: {chip.flops / 1e12:g} TFLOP/s bf16, {chip.hbm / 1e9:g} GB/s HBM, ICI "
           f"{chip.link / 1e9:g} GB/s per link and direction; roofline = max(compute, HBM) + collectives, not "
           "overlapped; counts per chip, each loop at its trip count)", TIME_HEAD]
  lines += [time_row(c) for c in results]
  decode = next((c for c in results if c.token is not None), None)
  if decode is not None:
    lines += decode_lines(decode.token, *decode_floor(cfg, model_cfg, mesh, p))
  seconds = {c.name: hlo_cost.roofline(c.cost).seconds for c in results if c.cost is not None}
  return lines + step_lines(cfg, model_cfg, seconds, mesh.devices.size)


def run_tpu(cfg: Config, tpu: str, hbm_gib: float = V5E_HBM_GIB, stand_in_model: bool = False,
            out=sys.stdout, programs: tuple[str, ...] | None = None) -> bool:
  """Print the plan, then compile every program (or those named in `programs`) for the TPU slice `tpu`;
  whether all of them fit."""
  chips = tpu_devices(tpu)
  model_cfg = models.config_for(cfg.model)
  model_cfg = stand_in(model_cfg) if stand_in_model else model_cfg
  p = plan(cfg, model_cfg, len(chips), int(hbm_gib * GIB))
  print(table(p), file=out, flush=True)
  check_mesh(p, len(chips))  # before minutes of compiling programs the trainers would not run
  mesh = mesh_lib.make_mesh(cfg.mesh, chips)
  # held to less than the chip has when asked: the compiler then refuses what would not fit there
  options = {} if hbm_gib >= V5E_HBM_GIB else {"xla_tpu_max_hbm_size_mib": max(1, round(hbm_gib * 1024))}
  model = f"tiny {model_cfg.family} stand-in" if stand_in_model else cfg.model.spec
  print(f"\nTPU compiler (libtpu {importlib.metadata.version('libtpu')}): {tpu} = {TPUS[tpu][0]}, {model}, "
        f"{hbm_gib:g} GiB usable per chip\n{TPU_HEAD}", file=out, flush=True)
  results, trips = [], {DECODE_LOOP: cfg.grpo.sampling.max_new_tokens}  # a whole rollout: no row stops early
  for name, lowered in lower_all(cfg, model_cfg, mesh, p.decode_layout, programs).items():
    results.append(compile_tpu(name, lowered, options, trips))
    print(tpu_row(results[-1], p), file=out, flush=True)
  absent = [name for name in programs or () if name not in {c.name for c in results}]
  if absent:  # the merge exists only in the merged decode layout
    print(f"{', '.join(absent)}: not a program of this run (decode layout {p.decode_layout})", file=out, flush=True)
  fits, line = tpu_verdict(tpu, results, p)
  report = [*tpu_notes(cfg, model_cfg, mesh), *time_report(cfg, model_cfg, mesh, p, results), line]
  print("\n".join(report), file=out, flush=True)
  return fits
