"""The names of the config choices whose implementations import jax, written once, without jax.

`config` validates `model.remat`, `model.quant` and the GRPO choices against these tuples at parse
time without importing jax (its modules import jax; `tpu_reason.models`' package does too, so the
model choices live here as well). Each implementing module dispatches on, or checks its own table
against, its tuple; nothing else spells the names out. Choices whose registries import no jax are
validated against those registries directly: `tags.SCHEMAS`, `data.sources.LOADERS`, `rewards.REWARDS`.
"""

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
