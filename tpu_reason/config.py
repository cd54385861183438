"""The run config: nested frozen dataclasses, one section each, and the checks of their values.

A schema only: each section checks its own values as it is built (ranges, names of the choices,
settings that must agree), raising a one-line `UserError`. Names are checked against the tables
of `choices`, which import nothing, so this module loads neither jax nor the maths libraries.
Reading recipes, overrides and the command line, and writing configs back, is `config_io`'s.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import typing
from pathlib import Path

from tpu_reason import choices
from tpu_reason.errors import UserError


# three one-digit terms: a step more than GRPO's default task, which its held-out evals also score
MULTI_STEP_TASK = "basic_arithmetic:min_terms=3,max_terms=3,min_digits=1,max_digits=1"
DEFAULT_SYSTEM_PROMPT = "Think step by step inside the reasoning tags, then give only the final answer inside the answer tags."


def _check(cond: bool, msg: str):
  if not cond:
    raise UserError(msg)


def _check_choice(field: str, value, valid):
  """`value` (or, for a tuple field, each of its items) is one of `valid`, a tuple of `choices` (the module
  that implements the choice asserts that its table names the same)."""
  bad = [v for v in (value if isinstance(value, tuple) else (value,)) if v not in valid]
  _check(not bad, f"{field} must be one of {', '.join(valid)}, got {', '.join(map(repr, bad))}")


@dataclasses.dataclass(frozen=True)
class ModelCfg:
  """Which checkpoint to load and how to run it."""

  spec: str = "smollm2-135m"
  dtype: str = "float32"  # compute/param dtype: float32 on CPU, bfloat16 on TPU
  # what the backward recomputes: none; dots (attention and elementwise: less memory, little time);
  # full (the whole layer: least memory, slowest). true / false read as full / none.
  remat: str = "none"
  # how the base projections are stored on device (QLoRA-style; LoRA and the embedding stay in dtype):
  # none; int8 (a scale per output channel); int4 (a scale per group of up to 128 inputs)
  quant: str = "none"
  # tokenizer surgery: strings (e.g. the tags) added as single tokens; their embedding rows (and untied head
  # columns) train with the LoRA. () = the tokenizer as shipped.
  add_tokens: tuple[str, ...] = ()
  vocab_chunk: int = 8192  # vocabulary columns per step of the chunked log-softmax (loss, log-probs)

  def __post_init__(self):
    _check_choice("model.quant", self.quant, choices.QUANT)
    _check_choice("model.dtype", self.dtype, choices.DTYPES)
    legacy = {**dict.fromkeys(("true", "yes", "on", "1"), "full"), **dict.fromkeys(("false", "no", "off", "0"), "none")}
    object.__setattr__(self, "remat", legacy.get(self.remat.lower(), self.remat))
    _check_choice("model.remat", self.remat, choices.REMAT)
    _check(self.vocab_chunk > 0, f"model.vocab_chunk must be > 0, got {self.vocab_chunk}")
    _check(bool(self.spec.strip()), "model.spec is empty: name a model (e.g. smollm2-135m, a .gguf file, a Hugging "
           "Face directory or an org/name hub id)")
    _check(all(self.add_tokens), f"model.add_tokens must not contain empty strings, got {list(self.add_tokens)}")
    dups = sorted({t for t in self.add_tokens if self.add_tokens.count(t) > 1})
    _check(not dups, f"model.add_tokens lists {', '.join(map(repr, dups))} more than once")


@dataclasses.dataclass(frozen=True)
class LoraCfg:
  """LoRA adapters on the projections whose names match `targets` (a regex)."""

  rank: int = 16
  alpha: float = 32.0
  targets: str = "q|k|v|o|gate|up|down"

  def __post_init__(self):
    _check(self.rank > 0, f"lora.rank must be > 0, got {self.rank}")
    _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise UserError(f"lora.targets={self.targets!r} is not a regular expression ({e})") from None


@dataclasses.dataclass(frozen=True)
class MeshCfg:
  """Device mesh: fsdp * tp must equal the device count (-1 = all remaining devices)."""

  fsdp: int = -1
  tp: int = 1
  # per-device peak FLOP/s, the MFU denominator; 0 = by the device kind (mesh.PEAK_FLOPS: v5e 1.97e14 bf16, ...)
  peak_flops: float = 0.0
  # the weights generation reads (choices.DECODE_LAYOUTS): merged = base + LoRA folded in, whole over fsdp, built
  # once per rollout (no weight all-gather per token); train = the training layout, adapters applied per token;
  # auto = merged when its copy fits beside what the device already holds
  decode_layout: str = "auto"

  def __post_init__(self):
    _check_choice("mesh.decode_layout", self.decode_layout, choices.DECODE_LAYOUTS)
    _check(self.peak_flops >= 0, f"mesh.peak_flops must be >= 0 (0 = by the device kind), got {self.peak_flops}")
    _check(self.tp >= 1 and (self.fsdp >= 1 or self.fsdp == -1), f"mesh sizes must be >= 1 (fsdp may be -1), got fsdp={self.fsdp} tp={self.tp}")


@dataclasses.dataclass(frozen=True)
class SamplingCfg:
  """Generation settings: `sampling` (eval, chat, generate), `grpo.sampling` (rollouts), `curate.sampling`."""

  section: typing.ClassVar[str] = "sampling"  # the name its messages use; `build` renames it where it is nested
  max_new_tokens: int = 512
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    _check(self.max_new_tokens > 0, f"sampling.max_new_tokens must be > 0, got {self.max_new_tokens}")
    _check(self.temperature >= 0, f"sampling.temperature must be >= 0, got {self.temperature}")
    _check(0 < self.top_p <= 1, f"sampling.top_p must be in (0, 1], got {self.top_p}")
    _check(self.top_k >= 0, f"sampling.top_k must be >= 0, got {self.top_k}")
    _check(self.seed >= 0, f"sampling.seed must be >= 0, got {self.seed}")


@dataclasses.dataclass(frozen=True)
class DataCfg:
  """Where examples come from and the fixed shapes they are bucketed into."""

  source: str = "reasoning_gym"  # choices.SOURCES: teacher, gsm8k, s1k, reasoning_gym, jsonl, parquet, ...
  path: str = ""  # file, directory or hub id for file-based sources
  task: str = "gsm_symbolic"  # reasoning-gym task, optionally with options: "chain_sum:min_digits=1,max_terms=2"
  size: int = 512
  seed: int = 0
  eval_size: int = 128  # held-out rows: rates on fewer than ~100 rows move by whole percents per row
  eval_seed: int = 10_000  # far from `seed`: nearby reasoning-gym seeds share rows
  schema: str = "reasoning"  # a tag schema of choices.SCHEMAS (tags.SCHEMAS)
  system_prompt: str = DEFAULT_SYSTEM_PROMPT
  max_prompt_tokens: int = 160  # TPU recipes: 256 / 512; the CPU default trims padding
  max_completion_tokens: int = 256
  completion_buckets: tuple[int, ...] = (128, 256)  # () = one bucket of max_completion_tokens
  pack: bool = False  # SFT: several examples per row of max_prompt + max_completion tokens (buckets unused)
  strict: bool = True

  def __post_init__(self):
    _check_choice("data.source", self.source, choices.SOURCES)
    _check_choice("data.schema", self.schema, choices.SCHEMAS)
    _check(self.size > 0 and self.eval_size >= 0, "data.size must be > 0 and data.eval_size >= 0")
    _check(self.max_prompt_tokens > 0 and self.max_completion_tokens > 0, "data token budgets must be > 0")
    _check(all(0 < b <= self.max_completion_tokens for b in self.completion_buckets),
           f"data.completion_buckets must lie in (0, max_completion_tokens={self.max_completion_tokens}]")


@dataclasses.dataclass(frozen=True)
class OptimCfg:
  """AdamW on the adapters with a clipped global norm and a warmup then decay of the learning rate:
  `train.optim` (SFT) and `grpo.optim`, warmup counted in each phase's steps."""

  section: typing.ClassVar[str] = "optim"
  lr: float = 1e-3
  warmup_steps: int = 5
  schedule: str = "cosine"  # choices.SCHEDULES: cosine | linear | constant (after warmup, to 10% of lr)
  weight_decay: float = 0.0
  clip_norm: float = 1.0

  def __post_init__(self):
    _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
    _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
    _check_choice("optim.schedule", self.schedule, choices.SCHEDULES)
    _check(self.weight_decay >= 0 and self.clip_norm > 0,
           f"optim.weight_decay must be >= 0 and optim.clip_norm > 0, got {self.weight_decay} and {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class TrainCfg:
  """SFT's steps, batch and optimizer; the run-wide settings both trainers' loop reads (seed, held-out
  generation, checkpoints kept, resume, the non-finite stop and the session budget)."""

  max_steps: int = 40
  batch_size: int = 4
  grad_accum: int = 1  # micro-batches per optimizer step
  optim: OptimCfg = OptimCfg()
  eval_every: int = 20
  save_every: int = 20
  seed: int = 0
  eval_generate: int = 128  # held-out prompts generated for format / answer accuracy (before / after)
  eval_max_new_tokens: int = 256
  keep_last: int = 2
  resume: str = "latest"  # latest | none | a step number
  max_nonfinite: int = 5  # consecutive skipped steps before the run stops
  max_minutes: float = 0.0  # session budget: save and stop after the step that crosses it (0 = none)

  def __post_init__(self):
    _check(self.max_steps > 0 and self.batch_size > 0 and self.grad_accum > 0,
           "train.max_steps, train.batch_size and train.grad_accum must be > 0")
    _check(self.batch_size % self.grad_accum == 0,
           f"train.batch_size={self.batch_size} must be a multiple of train.grad_accum={self.grad_accum}")
    _check(self.max_minutes >= 0, f"train.max_minutes must be >= 0 (0 = no budget), got {self.max_minutes}")
    _check(self.max_nonfinite > 0, f"train.max_nonfinite must be > 0, got {self.max_nonfinite}")
    _check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
    _check(self.eval_generate >= 0, f"train.eval_generate must be >= 0 (0 = no generation), got {self.eval_generate}")
    _check(self.eval_max_new_tokens > 0, f"train.eval_max_new_tokens must be > 0, got {self.eval_max_new_tokens}")
    _check(self.eval_every > 0 and self.save_every > 0 and self.keep_last > 0, "train.eval_every, save_every, keep_last must be > 0")
    _check(self.resume in ("latest", "none") or self.resume.isdigit(), f"train.resume must be latest, none or a step, got {self.resume!r}")


@dataclasses.dataclass(frozen=True)
class BudgetCfg:
  """s1 budget forcing at inference: cap the thinking, or extend it with "Wait"."""

  max_thinking_tokens: int = 0  # 0 = no cap; at the cap the closing tag is forced
  extend: int = 0  # times a close of the reasoning is suppressed and `wait` appended
  wait: str = "Wait"
  # Repetition guard: a reasoning whose last `repeat_ngram` tokens already occurred
  # `repeat_times - 1` times in its last `repeat_window` tokens is looping: its close is forced.
  repeat_ngram: int = 0  # 0 = off
  repeat_times: int = 3
  repeat_window: int = 256

  def __post_init__(self):
    _check(self.max_thinking_tokens >= 0 and self.extend >= 0, "budget.max_thinking_tokens and budget.extend must be >= 0")
    _check(self.repeat_ngram >= 0 and self.repeat_times >= 2, "budget.repeat_ngram must be >= 0 and budget.repeat_times >= 2")
    _check(not self.extend or self.wait.strip(), f"budget.extend={self.extend} appends budget.wait, which is empty: "
           "give the text to append (e.g. Wait)")
    _check(not self.repeat_ngram or self.repeat_window >= self.repeat_ngram * self.repeat_times,
           f"budget.repeat_window={self.repeat_window} must hold repeat_times={self.repeat_times} "
           f"n-grams of repeat_ngram={self.repeat_ngram} tokens")


@dataclasses.dataclass(frozen=True)
class EvalCfg:
  """`python -m tpu_reason.eval`: samples per prompt, batching, rows, printed examples."""

  k: int = 1  # samples per prompt (pass@k, maj@k); k > 1 needs sampling.temperature > 0
  batch_size: int = 16  # prompts per generation call, each decoded k times
  limit: int = 0  # first N rows of the --data file or of the held-out split (0 = all)
  show: int = 2  # completions printed per model and setting

  def __post_init__(self):
    _check(self.k >= 1 and self.batch_size >= 1, "eval.k and eval.batch_size must be >= 1")
    _check(self.limit >= 0 and self.show >= 0, "eval.limit and eval.show must be >= 0")


@dataclasses.dataclass(frozen=True)
class GrpoCfg:
  """GRPO: rollouts (`sampling`), rewards, the clipped objective, its optimizer and cadence.

  The run-wide settings (seed of the prompt order and the adapters, held-out generation, checkpoints
  kept, resume, the non-finite stop, the session budget) are `train`'s, read by the loop both share.
  """

  # Prompts: this reasoning-gym task ("" = data.task). The CPU default is one-digit arithmetic, where
  # a 135M model is right some of the time: GRPO needs groups whose rewards differ to learn anything.
  task: str = "basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=1"
  steps: int = 30  # rollout steps (each: generate, score, then num_iterations passes of updates)
  prompts: int = 2  # prompts per step; each is sampled `group` times
  group: int = 4  # completions per prompt (G)
  optim: OptimCfg = OptimCfg(lr=2e-4, warmup_steps=2)  # warmup in GRPO steps
  sampling: SamplingCfg = SamplingCfg(max_new_tokens=192, temperature=0.9, top_k=50)  # seed: the rollouts' keys
  rewards: tuple[str, ...] = ("format", "process", "outcome")  # of choices.reward_names()
  reward_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
  scale_rewards: str = "group"  # choices.ADVANTAGE_SCALES: group | batch | none (Dr. GRPO)
  std_ddof: int = 0  # the std of advantages and reward_std: 0 population, 1 sample (TRL's)
  loss: str = "grpo"  # choices.GRPO_LOSSES: grpo | dapo | dr_grpo (token-sum / (batch x max_new_tokens))
  beta: float = 0.04  # KL (k3) weight against the init policy (adapter off); 0 skips the reference pass
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  importance_level: str = "token"  # token | sequence (GSPO: one length-normalised ratio per completion)
  gspo_epsilon_low: float = 3e-4  # the clip of sequence-level ratios, which sit near 1 (GSPO paper, sec. 5.1)
  gspo_epsilon_high: float = 4e-4
  overlong_buffer: int = 0  # DAPO: N tokens before sampling.max_new_tokens over which a reward penalty grows (0 = off)
  overlong_penalty: float = 1.0  # that penalty: 0 at max_new_tokens - N tokens, linear to -this at the cap
  reward_aggregation: str = "sum"  # sum | normalize_each (GDPO: each reward normalised in its group first)
  # DAPO dynamic sampling: drop groups whose rewards are all equal (no gradient) and sample fresh prompts,
  # further along the stream, until `prompts` groups are kept or `max_resample_rounds` extra rounds are spent
  dynamic_sampling: bool = False
  max_resample_rounds: int = 2
  # A sampling budget: the run ends after the step whose prompt batches bring the completions sampled to this
  # (0 = none; `steps` still caps it). Compares variants that sample at different rates at equal cost.
  max_completions: int = 0
  num_iterations: int = 1  # μ: optimizer passes over each rollout batch
  mini_batch: int = 0  # prompts per optimizer update (0 = all prompts of the step)
  micro_batch: int = 1  # prompts per forward/backward (gradient accumulation inside a mini-batch)
  mask_truncated_completions: bool = False
  # the sampler's log-probs (merged bf16 weights) differ from the trainer's (adapters unmerged): `tis` weighs each
  # token's policy loss by min(exp(trainer - sampler), cap), truncated importance sampling (TRL's, Tunix's)
  rollout_correction: str = "none"
  rollout_correction_cap: float = 2.0
  init: str = "auto"  # auto (latest finished SFT run of model.spec, else base) | base | a run dir
  curriculum: tuple[str, ...] = ()  # easy reasoning-gym tasks served first (a warm-up)
  curriculum_steps: int = 0  # steps drawn from `curriculum` before `data.task`
  # More held-out sets scored greedily before and after (not at eval_every), each up to train.eval_generate rows:
  # "init" is the task of the SFT run GRPO starts from (its held-out rows, drawn as that run drew them; skipped
  # from the base), the others reasoning-gym tasks at data.eval_seed. The chain's final model on every task.
  eval_tasks: tuple[str, ...] = ("init", MULTI_STEP_TASK)
  eval_every: int = 10
  save_every: int = 10

  @property
  def mini(self) -> int:
    return self.mini_batch or self.prompts

  def __post_init__(self):
    _check(self.steps > 0 and self.prompts > 0, "grpo.steps and grpo.prompts must be > 0")
    _check(self.group >= 2, f"grpo.group must be >= 2 (advantages compare samples), got {self.group}")
    _check(self.sampling.temperature > 0,
           "grpo.sampling.temperature must be > 0 (greedy samples of a group are identical)")
    _check(len(self.rewards) == len(self.reward_weights), "grpo.rewards and grpo.reward_weights must have the same length")
    _check_choice("grpo.rewards", self.rewards, choices.reward_names())
    _check(bool(self.rewards), "grpo.rewards is empty: give at least one of " + ", ".join(choices.reward_names()))
    twice = sorted({r for r in self.rewards if self.rewards.count(r) > 1})
    _check(not twice, f"grpo.rewards names {', '.join(twice)} more than once: give each reward once, with its weight "
           "in grpo.reward_weights")
    _check_choice("grpo.reward_aggregation", self.reward_aggregation, choices.REWARD_AGGREGATIONS)
    _check_choice("grpo.scale_rewards", self.scale_rewards, choices.ADVANTAGE_SCALES)
    _check(self.std_ddof in (0, 1), f"grpo.std_ddof must be 0 (population) or 1 (sample, TRL's), got {self.std_ddof}")
    _check_choice("grpo.loss", self.loss, choices.GRPO_LOSSES)
    _check(self.beta >= 0 and self.epsilon_low >= 0 and self.epsilon_high >= 0, "grpo.beta and grpo.epsilon_* must be >= 0")
    _check_choice("grpo.importance_level", self.importance_level, choices.IMPORTANCE_LEVELS)
    _check_choice("grpo.rollout_correction", self.rollout_correction, choices.ROLLOUT_CORRECTIONS)
    _check(self.rollout_correction_cap >= 1,
           f"grpo.rollout_correction_cap must be >= 1, got {self.rollout_correction_cap}")
    _check(self.gspo_epsilon_low >= 0 and self.gspo_epsilon_high >= 0, "grpo.gspo_epsilon_* must be >= 0")
    _check(0 <= self.overlong_buffer <= self.sampling.max_new_tokens and self.overlong_penalty >= 0,
           f"grpo.overlong_buffer must be in [0, grpo.sampling.max_new_tokens={self.sampling.max_new_tokens}] and "
           "grpo.overlong_penalty "
           f">= 0, got {self.overlong_buffer} and {self.overlong_penalty}")
    _check(self.max_resample_rounds >= 0, f"grpo.max_resample_rounds must be >= 0, got {self.max_resample_rounds}")
    _check(self.max_completions >= 0 and self.max_completions % (self.prompts * self.group) == 0,
           f"grpo.max_completions must be 0 (no budget) or a multiple of grpo.prompts x grpo.group = "
           f"{self.prompts * self.group}, got {self.max_completions}")
    _check(self.num_iterations >= 1 and self.micro_batch >= 1 and self.mini_batch >= 0,
           "grpo.num_iterations and grpo.micro_batch must be >= 1, grpo.mini_batch >= 0")
    _check(self.prompts % self.mini == 0 and self.mini % self.micro_batch == 0,
           f"grpo.prompts={self.prompts} must be a multiple of grpo.mini_batch={self.mini}, "
           f"itself a multiple of grpo.micro_batch={self.micro_batch}")
    _check(self.eval_every > 0 and self.save_every > 0, "grpo.eval_every and grpo.save_every must be > 0")
    _check(bool(self.curriculum) or not self.curriculum_steps, "grpo.curriculum_steps needs grpo.curriculum tasks")
    _check(len(set(self.eval_tasks)) == len(self.eval_tasks) and all(self.eval_tasks),
           f"grpo.eval_tasks must name each task once, got {list(self.eval_tasks)}")


@dataclasses.dataclass(frozen=True)
class CurateCfg:
  """s1-style triage of a candidate pool (`data.*`) into a small set: quality, fit, difficulty, diversity."""

  tasks: tuple[str, ...] = ()  # reasoning-gym tasks pooled, data.size rows each; () = data.task (or data.path)
  target_size: int = 100  # rows in the curated set (fewer only if fewer survive)
  require_trace: bool = False  # drop rows without reasoning (False keeps prompt+answer rows for GRPO)
  near_dup_threshold: float = 0.8  # Jaccard of question word 3-shingles at or above which a row is a near-duplicate
  baselines: tuple[str, ...] = ("smollm2-135m",)  # model specs; () skips the difficulty stage
  k: int = 4  # samples per question per baseline
  max_solved: int = 0  # keep questions no baseline solved in more than this many of its k samples
  sampling: SamplingCfg = SamplingCfg(max_new_tokens=256, temperature=0.7, top_k=50)  # the baselines' samples
  batch_size: int = 8  # prompts per generate call (each sampled k times)
  strata: str = "auto"  # auto (domain if it varies, else keywords) | domain | keywords
  seed: int = 0  # the sample drawn within each stratum

  def __post_init__(self):
    _check(self.target_size > 0, f"curate.target_size must be > 0, got {self.target_size}")
    _check(0 < self.near_dup_threshold <= 1, f"curate.near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
    _check(self.k >= 1 and 0 <= self.max_solved < self.k,
           f"curate needs k >= 1 and 0 <= max_solved < k, got k={self.k} max_solved={self.max_solved}")
    _check(self.sampling.temperature > 0 or self.k == 1,
           "curate.k > 1 greedy samples are identical: set curate.sampling.temperature > 0")
    _check(self.batch_size > 0, f"curate.batch_size must be > 0, got {self.batch_size}")
    _check_choice("curate.strata", self.strata, choices.STRATA)


@dataclasses.dataclass(frozen=True)
class DistillCfg:
  """Teacher distillation from an OpenAI-compatible chat-completions server (DeepSeek, vLLM, llama.cpp)."""

  base_url: str = "http://127.0.0.1:8000/v1"  # POSTs go to {base_url}/chat/completions
  model: str = ""  # the teacher's name on that server
  api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable only (unset: no key sent)
  output: str = "data/teacher.jsonl"  # appended to; ids already in it are skipped
  concurrency: int = 8  # requests in flight
  timeout: float = 120.0  # seconds per request
  retries: int = 5  # extra attempts after a 429, a 5xx, a timeout or a dropped connection
  backoff: float = 1.0  # seconds before the first retry; doubles each time (or the server's Retry-After)
  temperature: float = 0.6
  max_tokens: int = 2048  # the teacher's reply budget (its JSON, not the student's 512 tokens)
  limit: int = 0  # questions to distil this run (0 = all)

  def __post_init__(self):
    _check(self.concurrency >= 1 and self.retries >= 0 and self.limit >= 0,
           "distill.concurrency must be >= 1, distill.retries and distill.limit >= 0")
    _check(self.timeout > 0 and self.backoff >= 0 and self.max_tokens > 0 and self.temperature >= 0,
           "distill.timeout and distill.max_tokens must be > 0, distill.backoff and distill.temperature >= 0")
    _check(re.match(r"https?://[^/\s]+", self.base_url) is not None,
           f"distill.base_url must be an http:// or https:// address, got {self.base_url!r}")


@dataclasses.dataclass(frozen=True)
class Config:
  """Top-level run config shared by every entry point."""

  name: str = "smollm2-135m-cpu"
  output_dir: str = ""  # default runs/<name>-<time>
  redact_thoughts: bool = False  # logs and sample files keep answers and the reasoning's length only
  model: ModelCfg = ModelCfg()
  lora: LoraCfg = LoraCfg()
  mesh: MeshCfg = MeshCfg()
  sampling: SamplingCfg = SamplingCfg()
  data: DataCfg = DataCfg()
  train: TrainCfg = TrainCfg()
  grpo: GrpoCfg = GrpoCfg()
  budget: BudgetCfg = BudgetCfg()
  curate: CurateCfg = CurateCfg()
  distill: DistillCfg = DistillCfg()
  eval: EvalCfg = EvalCfg()

  def resolved_output_dir(self, kind: str = "", *, named: bool = True, timestamp: bool = True) -> Path:
    """`output_dir`, else runs/<name>-<kind>-<time> (the one output-directory rule of every CLI).

    sft: runs/<name>-<time>; grpo: runs/<name>-grpo-<time>; eval (`named=False`): runs/eval-<time>;
    curate (`timestamp=False`): runs/<name>-curate, fixed so that rerunning the same command resumes.
    """
    if self.output_dir:
      return Path(self.output_dir)
    parts = [self.name] * named + [kind] * bool(kind) + [f"{datetime.datetime.now():%Y%m%d-%H%M%S}"] * timestamp
    return Path("runs") / "-".join(parts)
