"""What SFT and GRPO share: the trainable state, the optimizer and one jitted optimizer step.

The step is generic over `loss_fn(lora, params, micro_batch) -> (loss, aux)`: it accumulates
gradients over micro-batches, clips, applies AdamW to the LoRA adapters only, and skips
(and counts) a step whose loss or gradient norm is not finite.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from tpu_reason import choices, lora as lora_lib, models, sharding as sharding_lib
from tpu_reason.config import Config, OptimCfg


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["lora", "opt_state", "step", "bad_steps", "key"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything that changes during training (the base weights never do)."""

  lora: Any
  opt_state: Any
  step: jax.Array  # optimizer updates applied (or skipped)
  bad_steps: jax.Array  # consecutive skipped (non-finite) steps
  key: jax.Array


# after warmup: cosine / linear decay to 10%, or constant (names: choices.SCHEDULES)
DECAYS = {
    "cosine": lambda o, steps: optax.cosine_decay_schedule(o.lr, steps, alpha=0.1),
    "linear": lambda o, steps: optax.linear_schedule(o.lr, 0.1 * o.lr, steps),
    "constant": lambda o, steps: optax.constant_schedule(o.lr),
}
assert tuple(DECAYS) == choices.SCHEDULES


def schedule(o: OptimCfg, steps: int, per_step: int = 1) -> optax.Schedule:
  """The learning rate by optimizer update: linear warmup over `o.warmup_steps` steps, then `o.schedule`'s
  decay until `steps` end; a step is `per_step` updates (GRPO's mini-batches times iterations)."""
  total, warm = steps * per_step, o.warmup_steps * per_step
  decay = DECAYS[o.schedule](o, max(total - warm, 1))
  warmup = optax.linear_schedule(o.lr / max(warm, 1), o.lr, warm)
  return optax.join_schedules([warmup, decay], [warm])


def make_optimizer(o: OptimCfg, steps: int, per_step: int = 1) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(schedule(o, steps, per_step), b1=0.9, b2=0.999, weight_decay=o.weight_decay))


def init_state(lora, optimizer, seed: int) -> TrainState:
  return TrainState(lora, optimizer.init(lora), jnp.array(0, jnp.int32), jnp.array(0, jnp.int32),
                    jax.random.key_data(jax.random.key(seed)))


def step(state: TrainState, params, batch, *, loss_fn: Callable, optimizer, accum: int):
  """One optimizer update over `accum` equal micro-batches of `batch` (aux values averaged)."""
  micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(carry, mb):
    (loss, aux), grads = grad_fn(state.lora, params, mb)
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  (_, aux_shape), _ = jax.eval_shape(grad_fn, state.lora, params, first)
  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
           jax.tree.map(jnp.zeros_like, state.lora))
  (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, micro)
  loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
  new = TrainState(optax.apply_updates(state.lora, updates), opt_state, state.step + 1,
                   jnp.zeros_like(state.bad_steps), state.key)
  skip = dataclasses.replace(state, step=state.step + 1, bad_steps=state.bad_steps + 1)
  state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, skip)
  return state, {"loss": loss, "grad_norm": grad_norm, "finite": ok, **aux}


def state_sharding(model_cfg, cfg: Config, optimizer, mesh) -> TrainState:
  """TrainState of shardings: adapters (and their Adam moments) by the table, scalars replicated."""
  table = lora_lib.shapes(model_cfg, cfg.lora)
  lora_sh = sharding_lib.shardings(table, mesh)
  rep = sharding_lib.replicated(mesh)
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, abstract_lora(table)),
                                 lora_sh, transform_non_params=lambda _: rep)
  return TrainState(lora_sh, opt_sh, rep, rep, rep)


def abstract_lora(table: dict) -> Any:
  """ShapeDtypeStructs (f32) of the adapters described by `lora.shapes`."""
  return jax.tree.map(lambda sa: jax.ShapeDtypeStruct(sa[0], jnp.float32), models.unflatten(table),
                      is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], tuple))
