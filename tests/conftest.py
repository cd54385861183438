"""Shared test setup: 8 fake CPU devices for the whole session, tiny random models.

The XLA flag must be set before anything imports jax, so it sits at the very top of
this file (pytest imports conftest.py before any test module).
"""

import os

# libtpu is installed for the TPU compiler (plan --tpu compiles for compile-only chips); the tests
# themselves run on CPU devices, without probing for a TPU in every process
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# No LLVM optimisation passes: halves compiling, the whole cost of a tiny model's program, but makes a real
# model's elementwise work several times slower (test_budget's SmolLM2 run: 84 s against 46 s). So only for
# tiny-model child processes (`one_device_env`) and, in this process, tests that hold no real weights
# (`pytest_runtest_setup`).
QUICK_XLA = "--xla_backend_optimization_level=0"
# One compilation cache for the whole session, subprocesses (CLI runs, xdist workers) included: many tests
# build the same tiny trainer, and each would otherwise compile the same programs again. A fresh folder
# per session, so nothing compiled by another version is ever reused.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tpu_reason_tests_xla_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tpu_reason.models.transformer import ModelConfig, param_shapes  # noqa: E402
from tpu_reason.tree import unflatten  # noqa: E402

# A Llama-style model small enough to compile and run in milliseconds.
TINY_LLAMA = ModelConfig(
    family="llama", vocab_size=128, embed_dim=32, hidden_dim=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8)

# Gemma3-like: sliding window of 4 on even layers (global_every=2 -> layer 1 global),
# qk-norm, post-norms, sqrt(D) embedding scale, gelu, a separate local rope theta.
TINY_GEMMA3 = ModelConfig(
    family="gemma3", vocab_size=128, embed_dim=32, hidden_dim=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
    qk_norm=True, post_norms=True, embed_scale=True, act="gelu_tanh", query_scale=8**-0.5,
    sliding_window=4, global_every=2)

TINY = {"llama": TINY_LLAMA, "gemma3": TINY_GEMMA3}

# jit options for tiny models: they run in microseconds, so compiling is the whole cost,
# and skipping LLVM's optimisation passes halves it (numerics are unchanged: no fast-math).
TINY_JIT = {"xla_backend_optimization_level": 0}


def one_device_env(quick: bool = True, **extra: str) -> dict[str, str]:
  """A child process's environment: one CPU device, as a user has; `quick` (for tiny models) compiles
  without LLVM's passes."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return {**env, "XLA_FLAGS": QUICK_XLA if quick else "", "JAX_PLATFORMS": "cpu", **extra}


def tiny_params(cfg: ModelConfig, seed: int = 0):
  """Random float32 params like `init_params` (matrices ~ N(0, 1/fan_in)), but drawn with
  numpy (compiling jax's PRNG for every shape costs seconds on CPU) and with norm weights
  1 + noise instead of exactly 1, so a norm mix-up (e.g. gemma's 1 + w) would show."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, (shape, axes) in sorted(param_shapes(cfg).items()):
    if "norm" in name:
      flat[name] = 1.0 + 0.1 * rng.standard_normal(shape)
    elif "bias" in name:
      flat[name] = 0.02 * rng.standard_normal(shape)
    else:
      fan_in = shape[1] if axes[0] == "layers" else shape[0]
      if name.endswith("/o"):
        fan_in = shape[1] * shape[2]
      flat[name] = rng.standard_normal(shape) / np.sqrt(fan_in)
  return unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


# Fixtures that hold a real model: a test that uses one (directly or through another fixture) compiles with
# XLA's optimisations; every other test in this process compiles without most of them (a tiny model's
# program: 30% less time, e.g. test_precision + test_decode_layout 134-149 s -> 102 s). Set before the test's
# fixtures are built, so a module fixture computes its reference with the same compiler as its tests (the
# two settings round differently: 4e-5 apart on SmolLM2's logits).
REAL_WEIGHTS = {"smollm2", "gemma3", "embedded"}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  jax.config.update("jax_disable_most_optimizations", not REAL_WEIGHTS & set(item.fixturenames))


# Files whose tests take minutes (worker-seconds of a full run, 2026-12-07), collected first: with two
# workers (scripts/test.sh: --dist loadfile --no-loadscope-reorder) they start at once, and the many short
# files fill the gaps, instead of a long file being the last one left running.
HEAVY_FIRST = ("test_notebook.py", "test_plan_tpu.py", "test_grpo.py", "test_eval.py", "test_sft.py",
               "test_reliability.py", "test_export.py", "test_plan.py", "test_precision.py", "test_sampler.py",
               "test_budget.py", "test_quant.py", "test_add_tokens.py", "test_curate_pipeline.py", "test_safety.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(params=sorted(TINY), ids=lambda name: f"tiny-{name}")
def tiny(request):
  """(cfg, params) of a tiny random model, once per architecture."""
  cfg = TINY[request.param]
  return cfg, tiny_params(cfg)


@pytest.fixture(scope="session")
def smollm2():
  """The real embedded SmolLM2-135M (loaded once per session, ~5 s from the disk cache)."""
  from tpu_reason import models

  return models.load("smollm2-135m")


def write_run(out, spec: str = "tiny-llama", *overrides, trainer: str = "sft", init: str = "base", seed: int = 0):
  """A training run directory as the trainers write it (run.json, config.yaml, checkpoints/{last,best}).

  Step 1 is the best checkpoint and step 2 only the latest, with different random non-zero
  LoRAs (B != 0, so each changes the model). Returns (run dir, {1: lora, 2: lora}).
  """
  from tpu_reason import checkpoint, config_io, lora as lora_lib, models, runs, train
  from tpu_reason.config import Config

  cfg = config_io.load(Config, None, [f"output_dir={out}", f"model.spec={spec}", "lora.rank=4", "lora.alpha=8",
                                      "data.system_prompt=", *overrides])
  runs.write_info(out, trainer, init)
  config_io.save(cfg, out)
  model_cfg = models.load(spec).cfg
  ckpts = checkpoint.Checkpoints(out / "checkpoints", keep_last=2, best_metric="eval_loss")
  loras = {}
  for step, loss in ((1, 0.5), (2, 0.9)):
    rng = np.random.default_rng([seed, step])
    shapes = lora_lib.shapes(model_cfg, cfg.lora)
    loras[step] = unflatten({n: jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32) for n, (s, _) in shapes.items()})
    state = train.init_state(loras[step], train.make_optimizer(cfg.train.optim, cfg.train.max_steps), 0)
    meta = {"step": step, "data_position": step, "config": config_io.to_dict(cfg)}
    ckpts.save(step, state, meta)
    ckpts.save_best(step, state, meta, {"eval_loss": loss})
  ckpts.close()
  return out, loras


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """`write_run` for tiny-llama, once per session."""
  return write_run(tmp_path_factory.mktemp("run") / "tiny-run")
