"""`python -m tpu_reason.plan --config recipes/X.yaml [--devices 8 | --tpu v5e-8] [--hbm-gib G]`: will it fit?

Prints the per-device memory of the SFT step and of GRPO's two phases (rollouts, then the train step),
from abstract shapes only (`plan.analytical` says what each item counts): no weights are loaded or allocated.

A setting a trainer would refuse on this mesh (a batch fsdp does not divide) is a mesh error: the table
still prints (its verdict is the memory's), then the command exits 2 with one `error:` line naming the
settings and the mesh size, and compiles nothing.

With `--devices N`, jax gets N fake CPU devices and the SFT train step is lowered and compiled
on the recipe's mesh twice: with a tiny stand-in of the model family at the recipe's batch and
sequence shapes (a quick shape and sharding check), and with the real model's abstract shapes,
whose XLA buffer assignment is a second opinion on the per-device total. CPU XLA keeps some
bf16 temporaries in f32, so that figure reads high.

With `--tpu v5e-8` (or v5e-1, v5e-4), libtpu's compiler builds, for compile-only chips of that
slice and the real model's shapes, the programs a run executes: the SFT step, GRPO's prefill and
decode loop, its log-prob pass and its update step. Its buffer assignment is each program's real
per-chip HBM; it refuses a program that does not fit (NO FIT). The exit status then follows the
compiler's verdicts (and settings a trainer would refuse), not the analytical table's. With
`--hbm-gib` below the chip's 15.75 GiB the compiler is held to that much; with `--stand-in` it
compiles the tiny stand-in instead of the real model (seconds, not minutes); with `--programs sft,decode`
(any of sft, merge, prefill, decode, log-probs, update) it compiles only those: the real Gemma-3-1B's SFT
step alone is about a minute on 2 cores, every program about three.
"""

from __future__ import annotations

import math
import sys

import jax

from tpu_reason import config_io, models
from tpu_reason.config import Config
from tpu_reason.errors import UserError, cli
from tpu_reason.plan.analytical import GIB, Plan, check_mesh, plan, table
from tpu_reason.plan.lowering import compile_checks
from tpu_reason.plan.tpu import V5E_HBM_GIB, chosen_programs, run_tpu

FLAGS = {"--devices": "devices", "--hbm-gib": "hbm_gib", "--tpu": "tpu", "--stand-in": "stand_in?",
         "--programs": "programs"}


def _positive(flags: dict, name: str, kind, default, least=0):
  """A flag's finite value above `least` (nan, inf and a memory of no whole byte are refused here, not deep inside)."""
  value = flags.get(name, default)
  flag = f"--{name.replace('_', '-')}"
  try:
    value = kind(value)
  except (TypeError, ValueError, OverflowError):
    raise UserError(f"{flag} must be a positive {kind.__name__}, got {value!r}") from None
  if not math.isfinite(value) or value <= least:
    bound = f"a finite number above {least:g}" if least else f"a positive finite {kind.__name__}"
    raise UserError(f"{flag} must be {bound}, got {flags.get(name, default)}")
  return value


def n_devices(cfg: Config, devices: int | None) -> int:
  """The devices the plan is for: --devices, else the recipe's mesh, else this host's."""
  return devices or (cfg.mesh.fsdp * cfg.mesh.tp if cfg.mesh.fsdp != -1 else jax.device_count())


def run(cfg: Config, devices: int | None = None, hbm_gib: float = V5E_HBM_GIB, out=sys.stdout) -> Plan:
  """Print the memory plan (and, with fake `devices`, the compile checks); returns the plan."""
  model_cfg = models.config_for(cfg.model)
  n = n_devices(cfg, devices)
  p = plan(cfg, model_cfg, n, int(hbm_gib * GIB))
  print(table(p), file=out)
  if devices and not p.errors:  # the trainers would refuse this mesh: nothing to compile
    for line in compile_checks(cfg, model_cfg, p.hbm):
      print(line, file=out)
  return p


@cli
def main(argv: list[str] | None = None):
  cfg, flags = config_io.parse_args(Config, sys.argv[1:] if argv is None else argv, FLAGS)
  devices = _positive(flags, "devices", int, 0) if "devices" in flags else None
  hbm_gib = _positive(flags, "hbm_gib", float, V5E_HBM_GIB, least=0.001)  # below 1 MiB nothing fits
  tpu, stand_in_model = flags.get("tpu"), "stand_in" in flags
  if tpu is not None and devices:
    raise UserError("--devices (fake CPU devices) and --tpu (the TPU compiler) are exclusive")
  if tpu is not None and hbm_gib > V5E_HBM_GIB:
    raise UserError(f"--hbm-gib with --tpu can only lower the {V5E_HBM_GIB} GiB a v5e chip's programs may use, "
                    f"got {hbm_gib:g}")
  if stand_in_model and tpu is None:
    raise UserError("--stand-in goes with --tpu (with --devices the stand-in is always compiled first)")
  programs = chosen_programs(flags.get("programs"))
  if programs is not None and tpu is None:
    raise UserError("--programs goes with --tpu (it picks which programs the TPU compiler builds)")
  if devices or tpu is not None:  # before jax starts its backend: CPU stays the default, TPU chips only compile
    jax.config.update("jax_platforms", "cpu")
  if devices:
    jax.config.update("jax_num_cpu_devices", devices)
  if tpu is not None:
    sys.exit(0 if run_tpu(cfg, tpu, hbm_gib, stand_in_model, programs=programs) else 1)
  p = run(cfg, devices, hbm_gib)
  sys.stdout.flush()
  check_mesh(p, n_devices(cfg, devices))
  sys.exit(0 if p.fits else 1)
