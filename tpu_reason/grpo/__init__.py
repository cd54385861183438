"""GRPO on LoRA adapters: `python -m tpu_reason.grpo [--config recipes/X.yaml] [key=value ...]`.

`rollout`: sampling rounds, their rewards and advantages, dynamic sampling. `trainer`: the policy loss, the jitted
functions and the `Trainer` whose steps `loop` runs. `cli`: the init weights, the prompts, `build`, `run`, `main`.
"""

from tpu_reason.grpo.rollout import (ZERO_STD, Round, Stream, advantage_rewards, applicable, completion_metrics,
                                     fill_batch, informative_groups, keep_groups, reward_metrics, rollout_key,
                                     rollout_metrics, trim_prompts)
from tpu_reason.grpo.trainer import Trainer, jitted, loss, make_optimizer, updates_per_step
from tpu_reason.grpo.cli import build, load_prompts, main, resolve_init, run

__all__ = ["ZERO_STD", "Round", "Stream", "advantage_rewards", "applicable", "completion_metrics", "fill_batch",
           "informative_groups", "keep_groups", "reward_metrics", "rollout_key", "rollout_metrics", "trim_prompts",
           "Trainer", "jitted", "loss", "make_optimizer", "updates_per_step", "build", "load_prompts", "main",
           "resolve_init", "run"]
