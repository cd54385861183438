"""GRPO's rollout: sampling rounds, their rewards and group-relative advantages, and DAPO's dynamic sampling.

A round samples G completions per prompt of one batch (each prompt prefilled once, the key of its step and
round), scores them with the rewards and turns the scores into advantages (`sample_round`, `score_round`).
Dynamic sampling draws further rounds from the prompt stream until the batch holds only informative groups
(`dynamic_rounds`, `dynamic_batch`); the rest are the pure pieces these are made of.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from tpu_reason import distributed, losses, rewards, tags
from tpu_reason.config import GrpoCfg
from tpu_reason.data.batch import Collated, RolloutBatch
from tpu_reason.sampling import layout, sampler


ZERO_STD = 1e-6  # a group whose rewards' std is below this has nothing to learn from


def rollout_key(seed: int, step: int, round: int = 0) -> jax.Array:
  """The sampling key of step `step` (and of its resample `round` > 0 with dynamic sampling): fresh every
  step and round, the same on a resumed run."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  return jax.random.fold_in(key, round) if round else key


def reward_metrics(total: np.ndarray, parts: dict[str, list[float | None]], group: int,
                   ddof: int = 0) -> dict[str, float]:
  """TRL-named reward statistics of one rollout batch (rows grouped by prompt); `reward_std` is
  the mean of the groups' stds (TRL's figure when ddof=1). A reward's mean and std cover the rows
  it applies to (not None); one that skipped rows also logs how many it scored, `rewards/<fn>/rows`."""
  r = np.asarray(total, np.float64).reshape(-1, group)
  std = r.std(axis=1, ddof=ddof)
  out = {"reward": float(r.mean()), "reward_std": float(std.mean()),
         "frac_reward_zero_std": float(np.mean(std < ZERO_STD))}
  for name, values in parts.items():
    scored = applicable(values)
    if len(scored) < len(values):
      out[f"rewards/{name}/rows"] = float(len(scored))
    if scored:  # no NaN for a reward that applied to no row
      out[f"rewards/{name}/mean"] = float(np.mean(scored))
      out[f"rewards/{name}/std"] = float(np.std(scored))
  return out


def applicable(values: list[float | None]) -> list[float]:
  """The values of the rows a reward applies to (None: it does not)."""
  return [v for v in values if v is not None]


def advantage_rewards(total_B, parts: dict[str, list[float | None]], g: GrpoCfg) -> np.ndarray:
  """The per-completion reward the advantages come from: the weighted total (`sum`), or the weighted
  sum of the rewards each normalised within its group (`normalize_each`)."""
  if g.reward_aggregation == "sum":
    return np.asarray(total_B, np.float32)
  # a reward skips whole groups (one prompt, one set of columns): as 0s there it normalises to 0
  r_KxB = np.array([[0.0 if v is None else v for v in parts[name]] for name in g.rewards], np.float32)
  return np.asarray(losses.normalize_each(r_KxB, g.reward_weights, g.group, ddof=g.std_ddof), np.float32)


def informative_groups(rewards_B, group: int, ddof: int = 0) -> np.ndarray:
  """bool[groups]: whether a group's rewards differ (std >= ZERO_STD, the tolerance of frac_reward_zero_std).
  The others have advantages 0 in every scaling: no gradient."""
  return np.asarray(rewards_B, np.float64).reshape(-1, group).std(axis=1, ddof=ddof) >= ZERO_STD


def keep_groups(informative, prompts: list[str], taken: set[str], room: int) -> np.ndarray:
  """bool[groups]: which groups of one round join the step's batch: the informative ones, in order, whose
  prompt is not in it yet (`taken`, nor earlier in this round), at most `room` of them."""
  keep, taken = np.zeros(len(prompts), bool), set(taken)
  for i, (ok, prompt) in enumerate(zip(informative, prompts)):
    if ok and prompt not in taken and room > 0:
      keep[i], room = True, room - 1
      taken.add(prompt)
  return keep


def fill_batch(rounds: list, keep: list[np.ndarray], prompts: int, group: int):
  """One batch of exactly `prompts` groups (rows of `group`) from several rounds' arrays (each a pytree of the
  same structure holding a `RolloutBatch`, e.g. (arrays, rewards_B)): the kept groups in order, widths padded
  to the widest round (`_BxP` fields on the left, the others on the right, False / 0), then, for any group
  still missing, a filler: the first group's rows with completion mask off and advantage 0, so it adds
  nothing to the loss, its gradient or the masked metrics, and the batch keeps its one shape."""
  kept = sum(int(k.sum()) for k in keep)
  assert kept <= prompts, (kept, prompts)
  fillers = np.tile(np.arange(group), prompts - kept)

  def one(path, first, *rest):
    parts = [a[np.repeat(k, group)] for a, k in zip((first, *rest), keep)] + [first[fillers]]
    if first.ndim == 2:
      width = max(p.shape[1] for p in parts)
      left = getattr(path[-1], "name", "").endswith("_BxP")
      parts = [_pad_columns(p, width, left=left) for p in parts]
    return np.concatenate(parts)

  out = jax.tree_util.tree_map_with_path(one, *rounds)
  for arrays in jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, RolloutBatch)):
    if isinstance(arrays, RolloutBatch):
      arrays.completion_mask_BxC[kept * group:] = False
      arrays.advantages_B[kept * group:] = 0.0
  return out


def _pad_columns(x: np.ndarray, width: int, left: bool) -> np.ndarray:
  pad = (width - x.shape[1], 0) if left else (0, width - x.shape[1])
  return np.pad(x, ((0, 0), pad))


def completion_metrics(lengths: np.ndarray, truncated: np.ndarray) -> dict[str, float]:
  return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
          "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.mean())}


@dataclasses.dataclass
class Round:
  """One rollout round: a prompt batch sampled G times each, scored, with its advantages."""

  batch: Collated  # the prompt batch (ids, prompt texts, answers), its shared left padding trimmed
  arrays: RolloutBatch  # the train arrays, advantages_B included (not yet the stored log-probs)
  rewards_B: np.ndarray  # what the advantages come from: advantage_rewards + the overlong penalty
  total_B: np.ndarray  # the logged reward: the weighted total + the overlong penalty
  parts: dict  # each reward's values per row (None: it does not apply), `overlong` too when on
  gen: sampler.Generation
  texts: list[str]  # the completions, primer first


def rollout_metrics(rounds: list[Round], g: GrpoCfg) -> dict[str, float]:
  """Reward and completion statistics over every row the rounds drew; rollout time and speed of the first."""
  total = np.concatenate([r.total_B for r in rounds])
  parts = {name: [v for r in rounds for v in r.parts[name]] for name in rounds[0].parts}
  lengths = np.concatenate([r.gen.lengths for r in rounds])
  truncated = np.concatenate([r.gen.truncated for r in rounds])
  return {**reward_metrics(total, parts, g.group, g.std_ddof), **completion_metrics(lengths, truncated),
          "tokens_per_s/rollout": rounds[0].gen.tokens_per_second, "time/rollout": rounds[0].gen.seconds}


class Stream:
  """Prompt batches in order, counting those handed out: `position` is where a resumed run picks them up
  (the checkpoint's data_position; more than one batch a step with dynamic sampling)."""

  def __init__(self, batches, position: int):
    self.batches, self.position = batches, position

  def __iter__(self):
    return self

  def __next__(self) -> Collated:
    batch = next(self.batches)
    self.position += 1
    return batch


def trim_prompts(batch: Collated) -> Collated:
  """Cut the left padding all prompts share, to `sampler.prompt_width`: prefill and training skip it."""
  a = batch.arrays
  width = sampler.prompt_width(int(a.prompt_mask_BxP.sum(1).max()), a.prompt_mask_BxP.shape[1])
  arrays = dataclasses.replace(a, prompt_tokens_BxP=a.prompt_tokens_BxP[:, -width:],
                               prompt_mask_BxP=a.prompt_mask_BxP[:, -width:])
  return dataclasses.replace(batch, arrays=arrays)


def take(it, n: int):
  """The first `n` items of `it`, lazily."""
  for _, x in zip(range(n), it):
    yield x


def sample_round(weights: layout.Weights, batch: Collated, step: int, round: int, *, model, schema: tags.TagSchema,
                 g: GrpoCfg, mesh, dtype) -> Round:
  """Sample G completions per prompt of `batch` (the key of `step` and `round`; its rows over `mesh`), score them,
  compute advantages."""
  batch = trim_prompts(batch)
  a = batch.arrays
  prompts = distributed.global_batch((a.prompt_tokens_BxP, a.prompt_mask_BxP), mesh)
  with jax.set_mesh(mesh):  # each chip decodes its own rows
    gen = sampler.generate(weights.params, model.cfg, model.tokenizer, *prompts, eos_ids=model.eos_ids,
                           sampling=g.sampling, key=rollout_key(g.sampling.seed, step, round), group=g.group,
                           stop_strings=schema.stop_strings, dtype=dtype, pad_id=model.pad_id, **weights.kwargs())
  return score_round(batch, gen, g, schema)


def score_round(batch: Collated, gen: sampler.Generation, g: GrpoCfg, schema: tags.TagSchema) -> Round:
  """The round of `batch`'s completions `gen`: rewards (+ the overlong penalty), advantages, the train arrays."""
  a = batch.arrays
  texts = [schema.primer + t for t in gen.texts]
  rep = lambda xs: [x for x in xs for _ in range(g.group)]  # noqa: E731
  columns = {name: rep(values) for name, values in batch.columns.items()}  # one value per completion
  total, parts = rewards.score(rep(batch.prompt_text), texts, dict(zip(g.rewards, g.reward_weights)),
                               **columns, schema=schema.name)
  overlong = (np.asarray(losses.overlong_penalty(gen.lengths, g.sampling.max_new_tokens, g.overlong_buffer,
                                                 g.overlong_penalty), np.float32)
              if g.overlong_buffer else np.zeros(len(texts), np.float32))
  rewards_B = advantage_rewards(total, parts, g) + overlong
  adv = losses.group_advantages(rewards_B, g.group, scale=g.scale_rewards, ddof=g.std_ddof)
  total = np.asarray(total, np.float32) + overlong
  if g.overlong_buffer:  # logged like a reward: rewards/overlong/mean
    parts = {**parts, "overlong": overlong.tolist()}
  mask = gen.mask & ~(gen.truncated[:, None] & g.mask_truncated_completions)
  width = sampler.pow2_bucket(int(gen.lengths.max()), gen.tokens.shape[1])  # right padding nobody uses
  arrays = RolloutBatch(np.repeat(a.prompt_tokens_BxP, g.group, 0), np.repeat(a.prompt_mask_BxP, g.group, 0),
                        gen.tokens[:, :width], mask[:, :width], advantages_B=np.asarray(adv, np.float32),
                        sampler_logp_BxC=gen.logprobs[:, :width])
  return Round(batch, arrays, rewards_B, total, parts, gen, texts)


def dynamic_rounds(batch: Collated, stream, draw: Callable[[Collated, int], Round],
                   g: GrpoCfg) -> tuple[list[Round], list[np.ndarray], float]:
  """DAPO's dynamic sampling: keep the informative groups of `batch`, then of further batches of `stream` (each
  round drawn by `draw(batch, round)`), until g.prompts are kept or g.max_resample_rounds extra rounds are spent:
  (the rounds, each one's kept groups, the seconds the extra rounds took)."""
  rounds, keep, taken, extra = [], [], set(), 0.0
  while True:
    t0 = time.perf_counter()
    if rounds:
      batch = next(stream, None)  # fresh prompts, further along the stream
      if batch is None:  # grpo.max_completions is spent: train on what was kept
        break
    r = draw(batch, len(rounds))
    k = keep_groups(informative_groups(r.rewards_B, g.group, g.std_ddof), r.batch.prompt_text, taken,
                    g.prompts - len(taken))
    taken |= {p for p, kept in zip(r.batch.prompt_text, k) if kept}
    extra += (time.perf_counter() - t0) if rounds else 0.0
    rounds.append(r)
    keep.append(k)
    if len(taken) == g.prompts or len(rounds) > g.max_resample_rounds:
      break
  return rounds, keep, extra


def dynamic_batch(rounds: list[Round], keep: list[np.ndarray], g: GrpoCfg) -> RolloutBatch:
  """The train arrays of the kept groups, a batch still short filled with masked groups (`fill_batch`);
  advantages are those of the kept rows."""
  arrays, rewards_B = fill_batch([(r.arrays, r.rewards_B) for r in rounds], keep, g.prompts, g.group)
  n = kept_groups(keep) * g.group
  if n:  # the same per group; with scale_rewards=batch, one std over the rows that train
    arrays.advantages_B[:n] = losses.group_advantages(rewards_B[:n], g.group, scale=g.scale_rewards,
                                                      ddof=g.std_ddof)
  return arrays


def kept_groups(keep: list[np.ndarray]) -> int:
  return sum(int(k.sum()) for k in keep)


def dynamic_metrics(rounds: list[Round], keep: list[np.ndarray], extra: float, g: GrpoCfg) -> dict[str, float]:
  """The resample rounds' time and the groups they drew, kept and dropped."""
  drawn, kept = g.prompts * len(rounds), kept_groups(keep)
  return {"time/resample": extra, "dynamic/groups_drawn": float(drawn), "dynamic/groups_kept": float(kept),
          "dynamic/groups_dropped": float(drawn - kept), "dynamic/rounds": float(len(rounds) - 1)}


def dynamic_record(rounds: list[Round], keep: list[np.ndarray]) -> dict:
  """`Trainer.record`'s arguments for a dynamic step: every group drawn, and whether it was kept."""
  return {"ids": [i for r in rounds for i in r.batch.id], "texts": [t for r in rounds for t in r.texts],
          "kept": [bool(x) for k in keep for x in k]}
