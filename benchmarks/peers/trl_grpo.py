"""Peer GRPO step: TRL GRPOTrainer (no vLLM: transformers `generate`) + PEFT LoRA, SmolLM2-135M f32, CPU torch.

One optimizer step = one generation round: per-device batch = prompts x group rows, num_generations
= group, gradient_accumulation_steps 1 (so steps_per_generation 1, num_iterations 1: no old-logprob
pass, as ours on-policy). Every completion is exactly --new tokens (generation_kwargs min_new_tokens
= max_completion_length; the lengths TRL logs are checked). Temperature 1.0, top-k 50, beta as given
(the reference is the base model: TRL disables the adapter for it, as ours), a cheap digit-count reward.
Prompts: one-digit arithmetic questions under our GRPO system prompt, chat-templated by TRL.

Each step is timed from on_step_begin to on_step_end and split by wrapping the trainer's methods:
  generate   _generate_single_turn (left-padding + model.generate)
  reference  _get_per_token_logps_and_entropies under no_grad (the KL reference pass)
  reward     _calculate_rewards
  ref_reward _generate_and_score_completions minus generate: reference + reward + the rest of TRL's
             scoring (decoding, padding, advantages)
  train      the step minus _generate_and_score_completions (forward, backward, clip, AdamW)
so total = generate + ref_reward + train.
The first step is an untimed warm-up; the figures are the median of --steps.

Usage (peers venv): benchmarks/peers/.venv/bin/python benchmarks/peers/trl_grpo.py [--prompts 1]
  [--group 4] [--new 512] [--steps 2] [--beta 0.04] [--grad-ckpt]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import _peer

# our GRPO recipe's system prompt (config data.system_prompt), so the prompts are about our length
SYSTEM = "Think step by step inside the reasoning tags, then give only the final answer inside the answer tags."
PARTS = ("generate", "ref_reward", "reference", "reward", "train")  # reported; reference, reward within ref_reward
WRAPPED = ("generate", "reference", "reward", "scoring")  # seconds summed per step by the method wrappers


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prompts", type=int, default=1)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--new", type=int, default=512)
  ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
  ap.add_argument("--beta", type=float, default=0.04)
  ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (ours: model.remat, off)")
  return ap.parse_args(argv)


def _dataset(n: int):
  """n distinct one-digit arithmetic questions in chat form (TRL applies the template)."""
  from datasets import Dataset

  rows = []
  for i in range(n):
    x, y, op = 1 + (3 * i) % 9, 1 + (7 * i + 4) % 9, "+-*"[i % 3]
    rows.append([{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": f"What is {x} {op} {y}? Reply with the number."}])
  return Dataset.from_dict({"prompt": rows})


def digit_reward(completions, **kwargs) -> list[float]:
  """Cheap and non-constant: the share of digits in the completion (rewards differ within a group)."""
  texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
  return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def _config(a, out_dir: str):
  from trl import GRPOConfig

  rows = a.prompts * a.group
  return GRPOConfig(
      output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
      logging_steps=1, disable_tqdm=True, seed=0, max_steps=a.steps + 1, learning_rate=1e-4,
      lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
      num_generations=a.group, max_completion_length=a.new, temperature=1.0, top_k=50, top_p=1.0, beta=a.beta,
      generation_kwargs={"min_new_tokens": a.new}, activation_checkpointing=a.grad_ckpt, shuffle_dataset=False,
      dataloader_num_workers=0)


class PartClock:
  """Seconds spent in the trainer's generation / reference / reward / scoring methods, per step."""

  def __init__(self, trainer):
    self.cur = dict.fromkeys(WRAPPED, 0.0)
    self.steps: list[dict] = []
    self.lengths: list[list[int]] = []
    self.prompt_lengths: list[list[int]] = []
    self._wrap(trainer, "_generate_single_turn", "generate", self._record_lengths)
    self._wrap(trainer, "_calculate_rewards", "reward")
    self._wrap(trainer, "_generate_and_score_completions", "scoring")
    inner = trainer._get_per_token_logps_and_entropies

    @functools.wraps(inner)
    def logps(*args, **kw):
      import torch

      if torch.is_grad_enabled():  # the training forward: part of "train"
        return inner(*args, **kw)
      t = time.perf_counter()
      out = inner(*args, **kw)
      self.cur["reference"] += time.perf_counter() - t
      return out

    trainer._get_per_token_logps_and_entropies = logps

  def _wrap(self, trainer, name: str, part: str, after=None):
    inner = getattr(trainer, name)

    @functools.wraps(inner)
    def timed(*args, **kw):
      t = time.perf_counter()
      out = inner(*args, **kw)
      self.cur[part] += time.perf_counter() - t
      if after:
        after(args, out)
      return out

    setattr(trainer, name, timed)

  def _record_lengths(self, args, out):
    self.prompt_lengths.append([len(p) for p in args[0]])
    self.lengths.append([len(c) for c in out[0]])

  def close_step(self, total: float) -> None:
    """Record this step's parts (train = the rest of the step) and start the next."""
    p = {**self.cur, "total": total}
    scoring = p.pop("scoring")
    p["train"] = total - scoring
    p["ref_reward"] = scoring - p["generate"]  # reference + reward + decoding / advantages
    self.steps.append(p)
    self.cur = dict.fromkeys(WRAPPED, 0.0)
    print(f"    {_fmt(p)}", flush=True)


def run(a) -> dict:
  import torch
  from trl import GRPOTrainer

  versions = _peer.print_versions("trl_grpo")
  torch.manual_seed(0)
  model, tok = _peer.load_model(), _peer.load_tokenizer()
  clock = _peer.StepClock()
  trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=_config(a, tempfile.mkdtemp(prefix="trl_grpo_")),
                        train_dataset=_dataset(a.prompts * (a.steps + 1)), processing_class=tok,
                        peft_config=_peer.lora_config(), callbacks=[clock.callback()])
  n_lora = _peer.trainable_params(trainer.model)
  print(f"[trl_grpo] LoRA trainable parameters {n_lora:,} (ours {_peer.OURS_LORA_PARAMS:,}); gradient "
        f"checkpointing {trainer.args.gradient_checkpointing}; generation {trainer.generation_config.to_diff_dict()}",
        flush=True)
  parts = PartClock(trainer)
  clock.on_step = parts.close_step
  trainer.train()
  if len(parts.steps) != a.steps + 1:
    raise RuntimeError(f"expected {a.steps + 1} steps, timed {len(parts.steps)}")
  return _check(a, {"versions": versions, "lora_params": n_lora, "grad_ckpt": bool(trainer.args.gradient_checkpointing),
                    "steps": parts.steps, "lengths": parts.lengths,
                    "prompt_tokens": parts.prompt_lengths, "logged": _logged_lengths(clock.logs)})


def _fmt(p: dict) -> str:
  return ", ".join(f"{k} {p[k]:.1f} s" for k in ("total", *PARTS) if k in p)


def _logged_lengths(logs: list[dict]) -> list[dict]:
  keys = ("completions/min_length", "completions/max_length", "completions/mean_length", "reward", "kl")
  return [{k: x[k] for k in keys if k in x} for x in logs if "completions/min_length" in x]


def _check(a, r: dict) -> dict:
  """Every completion exactly --new tokens, by our count and by TRL's logged lengths."""
  bad = [n for step in r["lengths"] for n in step if n != a.new]
  logged = [x for x in r["logged"] if x["completions/min_length"] != a.new or x["completions/max_length"] != a.new]
  if bad or logged or len(r["lengths"]) != a.steps + 1:
    raise RuntimeError(f"completions not all {a.new} tokens: {r['lengths']} / logged {r['logged']}")
  return r


def report(r: dict, a) -> dict:
  timed = r["steps"][1:]
  med = {k: _peer.median([p[k] for p in timed]) for k in ("total", *PARTS)}
  rows = a.prompts * a.group
  out = {"side": "trl_grpo", "rows": rows, "new_tokens": a.new, **{f"{k}_s": v for k, v in med.items()},
         "tok_s": rows * a.new / med["total"], "rollout_tok_s": rows * a.new / med["generate"],
         "first_step_s": r["steps"][0]["total"], "rss_gib": _peer.peak_rss_gib(), **r}
  print(f"[trl_grpo] {a.prompts} prompts x G={a.group} x {a.new} new tokens (prompt tokens per row "
        f"{sorted(set(r['prompt_tokens'][0]))}), beta {a.beta}; warm-up step {out['first_step_s']:.1f} s")
  print("[trl_grpo] completion lengths by step (ours counted / TRL logged min-max): "
        + "; ".join(f"{sorted(set(n))} / {x['completions/min_length']:.0f}-{x['completions/max_length']:.0f}"
                    for n, x in zip(r["lengths"], r["logged"])))
  print(f"[trl_grpo] GRPO step (median of {len(timed)}): {_fmt(med)} "
        f"(ref_reward = reference + reward + the rest of TRL's scoring); generate {out['rollout_tok_s']:.0f} tok/s")
  print(f"[trl_grpo] peak RSS {out['rss_gib']:.2f} GiB; logged {r['logged']}")
  return out


def main(argv=None):
  a = _args(argv)
  _peer.emit(report(run(a), a))


if __name__ == "__main__":
  main()
