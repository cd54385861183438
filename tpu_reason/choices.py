"""The names of the config's choices, written once, importing nothing.

`config` validates every named choice (`model.remat`, `grpo.loss`, `data.source`, `grpo.rewards`, ...)
against these tuples at parse time, so that reading a config loads neither jax (which the modules
behind the model, loss and sampler choices import; `tpu_reason.models`' package does too) nor
math_verify and sympy (which `rewards` imports). Each implementing module dispatches on, or asserts
that its own table matches, its tuple; nothing else spells the names out.
"""

import sys

REMAT = ("none", "dots", "full")  # models.transformer.REMAT: what a layer keeps for its backward pass
QUANT = ("none", "int8", "int4")  # models.quant.DTYPES (and "none": the compute dtype): base projection storage
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo")  # losses.aggregate: how token losses become the batch loss
ADVANTAGE_SCALES = ("group", "batch", "none")  # losses.group_advantages: what the centred rewards are divided by
IMPORTANCE_LEVELS = ("token", "sequence")  # losses.log_ratio: one ratio per token, or GSPO's per completion
ROLLOUT_CORRECTIONS = ("none", "tis")  # grpo.loss: weigh tokens by the trainer / sampler ratio (truncated)
REWARD_AGGREGATIONS = ("sum", "normalize_each")  # grpo.advantage_rewards: the reward the advantages come from
SCHEDULES = ("cosine", "linear", "constant")  # train.DECAYS: the learning rate after warmup
DTYPES = ("float32", "bfloat16")  # model.dtype: the compute / base-weight dtype
DECODE_LAYOUTS = ("auto", "merged", "train")  # sampling.layout.MODES: the weights the sampler reads
STRATA = ("auto", "domain", "keywords")  # curate.diversity.strata: what rows are balanced over
REWARDS = ("format", "format_soft", "process", "outcome")  # rewards.REWARDS: what grpo.rewards may name
# data.sources.LOADERS: what data.source may name
SOURCES = ("teacher", "gsm8k", "s1k", "dolphin_r1", "dolphin-r1", "reasoning_gym", "jsonl", "parquet")
SCHEMAS = ("reasoning", "think", "s1")  # tags.SCHEMAS: the tag schemas of data.schema


def reward_names() -> tuple[str, ...]:
  """What grpo.rewards may name: the built-in REWARDS and any reward a program registered in `rewards.REWARDS`
  at run time (a program that registers one has imported `rewards`; reading a config never has to)."""
  loaded = sys.modules.get("tpu_reason.rewards")
  return REWARDS + tuple(n for n in (loaded.REWARDS if loaded else ()) if n not in REWARDS)
