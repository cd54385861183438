"""The Tunix side of benchmarks/sft_throughput.py and grpo_throughput.py, through Tunix's own stack.

SmolLM2-135M is built as Tunix's llama3 nnx model (`tunix.models.llama3.model.Llama3`), its
weights copied from our loaded checkpoint, LoRA added with qwix (`qwix.LoraProvider` +
`qwix.apply_lora_to_model`). SFT: trained with `tunix.sft.peft_trainer.PeftTrainer` and its
default loss. GRPO: sampled with `tunix.generate.sampler.Sampler`, trained with
`tunix.rl.grpo.grpo_learner.GRPOLearner` on an `RLCluster` whose roles share one mesh.
Nothing of Tunix is re-implemented here: we only build inputs, configure it and time it.

Used only by the benchmark; imports Tunix, qwix and flax, which the package itself does not need.
"""

from __future__ import annotations

import copy
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.generate import sampler as tunix_sampler
from tunix.models.llama3 import model as llama3
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl import utils as rl_utils
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import hooks, peft_trainer, sharding_utils
from tunix.sft import utils as sft_utils

# qwix matches rules with re.fullmatch against nnx paths such as "layers/3/attn/q_proj".
LORA_MODULE_PATH = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def llama3_config(cfg, remat: bool = False) -> llama3.ModelConfig:
  """Tunix's llama3 ModelConfig for one of our (llama-family, tied-embedding) configs."""
  if cfg.family != "llama":
    raise ValueError(f"Tunix comparison needs a llama-family model, got {cfg.family!r}")
  return llama3.ModelConfig(
      num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
      hidden_dim=cfg.hidden_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      num_kv_heads=cfg.num_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.norm_eps,
      weight_tying=cfg.tie_embeddings,
      remat_config=llama3.RematConfig.DECODER if remat else llama3.RematConfig.NONE)


def _tunix_path_to_ours(path: tuple) -> tuple[str, int | None]:
  """('layers', 3, 'attn', 'q_proj', 'w') -> ('layers/q', 3); top-level leaves -> (name, None)."""
  if path == ("embedder", "input_embedding"):
    return "embed", None
  if path == ("final_norm", "w"):
    return "final_norm", None
  if path[0] == "layers":
    sub = path[2:]
    name = {
        ("input_layernorm", "w"): "attn_norm",
        ("post_attention_layernorm", "w"): "ffn_norm",
        ("attn", "q_proj", "w"): "q", ("attn", "k_proj", "w"): "k",
        ("attn", "v_proj", "w"): "v", ("attn", "o_proj", "w"): "o",
        ("mlp", "gate_proj", "kernel"): "gate", ("mlp", "up_proj", "kernel"): "up",
        ("mlp", "down_proj", "kernel"): "down",
    }.get(sub)
    if name is not None:
      return f"layers/{name}", int(path[1])
  raise KeyError(f"no mapping for Tunix parameter {'/'.join(map(str, path))}")


def load_llama3(params, cfg, remat: bool = False) -> llama3.Llama3:
  """Tunix Llama3 with our weights: built abstractly (no random init), then every Param filled.

  `params` is our pytree (`embed` [V,D], `layers/q` [L,D,N,H], ...); the per-layer slices
  already have Tunix's layouts (q (D,N,H), k/v (D,K,H), o (N,H,D), gate/up (D,F), down (F,D)).
  """
  model = nnx.eval_shape(lambda: llama3.Llama3(llama3_config(cfg, remat), rngs=nnx.Rngs(0)))
  flat = {"embed": params["embed"], "final_norm": params["final_norm"],
          **{f"layers/{k}": v for k, v in params["layers"].items()}}
  filled = 0
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Param):
      continue
    name, layer = _tunix_path_to_ours(path)
    src = flat[name] if layer is None else flat[name][layer]
    want = var.get_value()
    if tuple(src.shape) != tuple(want.shape):
      raise ValueError(f"{'/'.join(map(str, path))}: ours {src.shape} vs Tunix {want.shape}")
    var.set_value(jnp.asarray(src, want.dtype))
    filled += 1
  expected = 2 + 9 * cfg.num_layers
  if filled != expected:
    raise ValueError(f"filled {filled} Tunix params, expected {expected}")
  return model


def apply_lora(model: llama3.Llama3, rank: int, alpha: float, seed: int = 0) -> llama3.Llama3:
  """qwix LoRA on the 7 projections of every layer (A he-uniform, B zeros: output unchanged)."""
  provider = qwix.LoraProvider(module_path=LORA_MODULE_PATH, rank=rank, alpha=alpha)
  lora_model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(seed), **model.get_model_input())
  n_lora = sum(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(lora_model))
  expected = 2 * 7 * model.config.num_layers
  if n_lora != expected:
    raise ValueError(f"qwix created {n_lora} LoRA params, expected {expected} (regex {LORA_MODULE_PATH!r})")
  return lora_model


def lora_param_count(model) -> int:
  return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.LoRAParam))


def gen_model_input_fn(x: peft_trainer.TrainingInput) -> dict:
  """TrainingInput -> the kwargs of Tunix's default loss (as tunix/cli/peft_main.py does it).

  The benchmark batch has no padding, so every token is attendable; `input_mask` (the loss
  mask) is what selects the completion tokens.
  """
  pad_mask = jnp.ones_like(x.input_tokens, dtype=jnp.bool_)
  return {
      "input_tokens": x.input_tokens,
      "input_mask": x.input_mask,
      "positions": sft_utils.build_positions_from_mask(pad_mask),
      "attention_mask": sft_utils.make_causal_attn_mask(pad_mask),
  }


def training_input(tokens_BxT: np.ndarray, loss_mask_BxT: np.ndarray) -> peft_trainer.TrainingInput:
  return peft_trainer.TrainingInput(input_tokens=tokens_BxT, input_mask=loss_mask_BxT)


def logits_max_diff(tunix_model, our_params, our_cfg, tokens_1xT: np.ndarray) -> dict[str, float]:
  """Max |logit difference| between Tunix's model and ours on one short row.

  Tunix 0.1.7's llama3 Attention calls `apply_rope` without `rope_theta`, so it always uses
  the default 1e6 whatever the config says; we also compare against our model run with
  theta = 1e6 to show the weight mapping itself is exact.
  """
  import dataclasses

  from tpu_reason.models import transformer

  t = tokens_1xT.shape[1]
  pos = np.arange(t, dtype=np.int32)[None]
  tunix_logits, _ = nnx.jit(lambda m, x, p, a: m(x, p, None, a))(
      tunix_model, jnp.asarray(tokens_1xT), jnp.asarray(pos),
      sft_utils.make_causal_attn_mask(jnp.ones((1, t), bool)))
  params = jax.tree.map(jnp.asarray, our_params)
  out = {}
  for label, theta in (("ours", our_cfg.rope_theta), ("ours_theta1e6", 1e6)):
    cfg = dataclasses.replace(our_cfg, rope_theta=theta)
    ours = transformer.logits(params, cfg, transformer.forward(params, cfg, jnp.asarray(tokens_1xT), jnp.asarray(pos)))
    out[label] = float(jnp.max(jnp.abs(ours - tunix_logits)))
  out["logit_scale"] = float(jnp.max(jnp.abs(tunix_logits)))
  return out


class _StepClock(hooks.TrainingHooks):
  """Wall-clock stamps at every step start and at train end.

  With `max_inflight_computations=1` PeftTrainer blocks on step i-1's loss before starting
  step i, so consecutive stamps bracket exactly one step (dispatch + compute + trainer
  bookkeeping), like our loop's block_until_ready per step.
  """

  def __init__(self):
    self.stamps: list[float] = []

  def on_train_start(self, train_ctx):
    pass

  def on_train_end(self, train_ctx):
    self.stamps.append(time.perf_counter())

  def on_train_step_start(self, train_ctx):
    self.stamps.append(time.perf_counter())

  def on_train_step_end(self, train_ctx, train_step, train_loss):
    pass

  def on_eval_step_start(self, train_ctx):
    pass

  def on_eval_step_end(self, train_ctx, eval_loss):
    pass


def make_optimizer(lr: float = 1e-3, clip_norm: float = 1.0, weight_decay: float = 0.0):
  """optax adamw with global-norm clipping: the same transformation our SFT uses (constant lr)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=weight_decay))


def xla_memory(trainer: peft_trainer.PeftTrainer, batch) -> dict[str, int]:
  """XLA's buffer sizes (bytes) for PeftTrainer's train step on `batch`, from an AOT compile.

  Traces the trainer's own step function (`create_train_step_fn`) the way `train()` jits it;
  costs one extra compile (served from the persistent cache when that is enabled).
  """
  step = nnx.jit(trainer.create_train_step_fn(), donate_argnames=("optimizer",))
  ma = step.lower(trainer.model, trainer.optimizer, batch).compile().memory_analysis()
  return {"temp": ma.temp_size_in_bytes, "args": ma.argument_size_in_bytes, "out": ma.output_size_in_bytes}


def run(model, batch: peft_trainer.TrainingInput, steps: int, before_train=None) -> dict:
  """Warm-up (compile) step + `steps` timed steps through PeftTrainer.train; returns timings.

  `before_train(trainer)` runs once the trainer is built (the benchmark uses it for its
  memory estimate / guard).
  """
  clock = _StepClock()
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=10**9,  # no eval set anyway
      max_steps=steps + 1,
      checkpoint_root_directory=None,  # None disables Tunix's orbax checkpointing (nothing on disk)
      metrics_logging_options=None,  # None: in-memory metrics only, no TensorBoard/W&B backends
      max_inflight_computations=1,
      pbar_description=None,
  )
  trainer = peft_trainer.PeftTrainer(model, make_optimizer(), config).with_gen_model_input_fn(gen_model_input_fn)
  trainer.with_training_hooks(clock)
  if before_train is not None:
    before_train(trainer)
  trainer.train([batch] * (steps + 1))
  losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
  s = clock.stamps
  if len(s) != steps + 2:
    raise RuntimeError(f"expected {steps + 2} step stamps from PeftTrainer, got {len(s)}")
  return {"first_step_s": s[1] - s[0], "times": [b - a for a, b in itertools.pairwise(s[1:])],
          "losses": [float(x) for x in np.ravel(losses)]}


# --------------------------------------------------------------------------- GRPO

# our grpo.loss -> Tunix's loss_agg_mode
LOSS_AGG = {"grpo": "sequence-mean-token-mean", "dapo": "token-mean"}


def tokenizer_with_pad(tokenizer, pad_token: str):
  """A copy of `tokenizer` padding with `pad_token`.

  Tunix treats every token equal to pad_id as padding, in prompts and completions alike;
  SmolLM2 pads with its EOS <|im_end|>, which also closes each turn of a chat prompt.
  """
  tok = copy.deepcopy(tokenizer)
  tok.pad_token = pad_token
  return tok


def place_replicated(model: nnx.Module, sharding) -> nnx.Module:
  """Put every variable of `model` on `sharding` (in place; returns `model`).

  RLCluster reshards, i.e. copies, a model that is not already on its role's mesh: placing
  the base model once, before LoRA is added, keeps one copy shared by actor and reference.
  """
  nnx.update(model, jax.device_put(nnx.state(model), sharding))
  return model


def sampler(model: nnx.Module, tokenizer, cache_size: int) -> tunix_sampler.Sampler:
  c = model.config
  return tunix_sampler.Sampler(model, tokenizer, tunix_sampler.CacheConfig(
      cache_size=cache_size, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim))


def grpo(actor: nnx.Module, reference: nnx.Module, tokenizer, mesh, g, *, prompt_len: int, steps: int,
         eos_ids: list[int], reward_fn) -> grpo_learner.GRPOLearner:
  """GRPOLearner for our GrpoCfg `g`: every role on `mesh`, the vanilla rollout, no checkpoints.

  `actor` must be `reference` with qwix LoRA on top (same base arrays): RLCluster then shares
  the backbone between the actor, its rollout and the reference instead of copying it.
  """
  if not rl_utils.is_sharing_backbone(actor, reference):
    raise ValueError("actor and reference must share their base arrays")
  if g.num_iterations != 1 or g.epsilon_low != g.epsilon_high or g.loss not in LOSS_AGG:
    raise ValueError("the Tunix comparison supports num_iterations=1, epsilon_low == epsilon_high and "
                     f"grpo.loss in {sorted(LOSS_AGG)}")
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=make_optimizer(g.optim.lr),
      eval_every_n_steps=10**9,
      max_steps=steps,  # optimizer updates: one per step when mini_batch = all prompts
      mini_batch_size=g.mini,
      train_micro_batch_size=g.micro_batch,
      rollout_micro_batch_size=g.prompts,  # one rollout of prompts x G rows, like ours
      compute_logps_micro_batch_size=g.micro_batch,
      checkpoint_root_directory=None,
      metrics_logging_options=None,
      pbar_description=None,
  )
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=g.sampling.max_new_tokens, max_prompt_length=prompt_len,
      kv_cache_size=prompt_len + g.sampling.max_new_tokens, temperature=g.sampling.temperature,
      top_p=g.sampling.top_p, top_k=g.sampling.top_k or None, eos_tokens=list(eos_ids))
  roles = rl_cluster_lib.Role
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=reference, tokenizer=tokenizer,
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
          rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout))
  algo = grpo_learner.GRPOConfig(num_generations=g.group, num_iterations=g.num_iterations, beta=g.beta,
                                 epsilon=g.epsilon_low, loss_agg_mode=LOSS_AGG[g.loss])
  return grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[reward_fn])


def grpo_xla_memory(learner: grpo_learner.GRPOLearner, rows: int, prompt_len: int, new_tokens: int) -> dict[str, int]:
  """XLA's buffer sizes (bytes) for the actor's train step on one micro-batch of `rows` sequences."""
  example = grpo_learner.TrainExample(
      prompt_ids=jnp.zeros((rows, prompt_len), jnp.int32), prompt_mask=jnp.ones((rows, prompt_len), bool),
      completion_ids=jnp.zeros((rows, new_tokens), jnp.int32),
      completion_mask=jnp.ones((rows, new_tokens), bool), advantages=jnp.zeros((rows,), jnp.float32),
      ref_per_token_logps=jnp.zeros((rows, new_tokens), jnp.float32), old_per_token_logps=None)
  trainer = learner.rl_cluster.actor_trainer
  with learner.rl_cluster.cluster_config.role_to_mesh[rl_cluster_lib.Role.ACTOR]:
    # builds the trainer's jitted step as train() will, which first puts the optimizer state
    # on the mesh: the estimate then compiles the very program training runs (a cache hit)
    trainer.jit_train_and_eval_step()
    example = sharding_utils.shard_input(example, trainer.config.data_sharding_axis)
    return xla_memory(trainer, example)


class GrpoClock:
  """Wall-clock split of every GRPOLearner step into rollout, reference, train and total.

  Instance attributes shadow the RLCluster / learner methods one step calls, so Tunix's code
  runs unchanged. Rollout and reference run in the learner's data thread while the trainer
  waits for them (actor and rollout share a mesh, so Tunix does not overlap them); the
  reference log-probs are blocked on so their time is not billed to training.
  """

  def __init__(self, learner: grpo_learner.GRPOLearner):
    self.steps: list[dict[str, float]] = []
    cluster = learner.rl_cluster
    self._wrap(learner, "_run_global_step", "total", starts_step=True)
    self._wrap(cluster, "generate", "rollout")
    self._wrap(cluster, "get_ref_per_token_logps", "reference", block=True)
    self._wrap(cluster, "update_actor", "train")

  def _wrap(self, obj, method: str, part: str, starts_step: bool = False, block: bool = False):
    fn = getattr(obj, method)

    def timed(*args, **kwargs):
      if starts_step:
        self.steps.append({})
      t = time.perf_counter()
      out = fn(*args, **kwargs)
      if block:
        jax.block_until_ready(out)
      step = self.steps[-1]
      step[part] = step.get(part, 0.0) + time.perf_counter() - t
      return out

    setattr(obj, method, timed)


def grpo_setup(learner: grpo_learner.GRPOLearner) -> dict:
  """What the comparison should say about this learner's setup."""
  cluster = learner.rl_cluster
  return {"shares_backbone": bool(rl_utils.is_sharing_backbone(cluster.actor_trainer.model,
                                                               cluster.inference_worker.get_model("reference"))),
          "rollout_seed": repr(cluster.get_rollout_config(rl_cluster_lib.Mode.TRAIN).seed)}
