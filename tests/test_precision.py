"""Mixed precision on a bf16 recipe: base weights in bf16, LoRA, gradients and Adam state in f32.

At GRPO's learning rate (3e-6) an Adam step moves each adapter entry by ~3e-6, far below
bf16's resolution (8 bits of mantissa) for entries of size ~0.1: bf16 master weights would
barely move. The B matrices are made non-zero first, as after a few steps, so that A has a
gradient at all (with B = 0 it has none in any precision).
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import test_grpo, test_sft
from tpu_reason import checkpoint, grpo, loop, sft, train as train_lib

pytestmark = pytest.mark.slow  # whole bf16 trainer steps

LR = "3e-6"


def trained(lora):
  return jax.tree.map(lambda x: x + 0.01, lora)


def changed_a(before, after) -> float:
  """Fraction of LoRA-A entries that an update changed."""
  pairs = [(before["layers"][n]["a"], after["layers"][n]["a"]) for n in before["layers"]]
  return sum(int((np.asarray(a) != np.asarray(b)).sum()) for a, b in pairs) / sum(a.size for a, _ in pairs)


def fresh(tr, dtype=jnp.float32):
  """A state as `loop.initial_state` makes it, B non-zero, adapters cast to `dtype`."""
  ckpts = checkpoint.Checkpoints(tr.out / "none", keep_last=1)
  try:
    state, _ = loop.initial_state(tr, ckpts)
  finally:
    ckpts.close()
  lora = jax.tree.map(lambda x: np.asarray(x).astype(dtype), trained(state.lora))
  return jax.device_put(train_lib.init_state(lora, tr.optimizer, 0), tr.state_sharding)


def float_dtypes(tree) -> set:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def sft_trainer(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bf16_sft")
  data = test_sft.write_rows(tmp / "rows.jsonl", 16, 16, 4)
  return sft.build(test_sft.make_cfg(tmp / "run", data, "model.dtype=bfloat16", f"train.optim.lr={LR}",
                                     "train.optim.warmup_steps=0", "train.optim.schedule=constant"))


def sft_step(tr, state):
  from tpu_reason.data import loader

  batch = next(loader.batches(tr.train, tr.cfg.train.batch_size, seed=0))
  with jax.set_mesh(tr.mesh):
    return tr.step_fn(state, tr.params, tr.place_batch(batch))[0]


def test_sft_step_in_bf16_moves_every_adapter_entry_and_checkpoints_f32(sft_trainer, tmp_path):
  tr = sft_trainer
  assert {x.dtype for x in jax.tree.leaves(tr.params)} == {jnp.dtype(jnp.bfloat16)}
  state = fresh(tr)
  assert float_dtypes(state.lora) == float_dtypes(state.opt_state) == {"float32"}
  before = jax.device_get(state.lora)
  state = sft_step(tr, state)
  assert float_dtypes(state.lora) == float_dtypes(state.opt_state) == {"float32"}
  assert changed_a(before, jax.device_get(state.lora)) >= 0.99

  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep_last=1)
  ckpts.save(1, state, {"step": 1})
  ckpts.close()
  saved = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "ckpt" / "last" / "1" / "state").tree
  assert float_dtypes(saved["lora"]) == float_dtypes(saved["opt_state"]) == {"float32"}


def test_the_same_step_with_bf16_adapters_barely_moves_them(sft_trainer):
  """The counter-case this design avoids: bf16 master weights swallow a 3e-6 update."""
  state = fresh(sft_trainer, jnp.bfloat16)
  before = jax.device_get(state.lora)
  after = jax.device_get(sft_step(sft_trainer, state).lora)
  assert changed_a(before, after) < 0.05


def test_grpo_step_in_bf16_moves_every_adapter_entry(tmp_path):
  data = test_sft.write_rows(tmp_path / "rows.jsonl", 24, 8, 4)
  tr = grpo.build(test_grpo.make_cfg(tmp_path / "run", data, "model.dtype=bfloat16", f"grpo.optim.lr={LR}",
                                     "grpo.beta=0.04"))
  state = fresh(tr)
  before = jax.device_get(state.lora)
  with jax.set_mesh(tr.mesh):
    state, m, _ = tr.step(state, next(tr.batches(0)), 0)
  assert m["finite"] and m["grad_norm"] > 0
  assert float_dtypes(state.lora) == float_dtypes(state.opt_state) == {"float32"}
  assert changed_a(before, jax.device_get(state.lora)) >= 0.99
