"""Peer SFT step: TRL SFTTrainer + PEFT LoRA on SmolLM2-135M f32, CPU torch; same shape as ours.

The batch is benchmarks/sft_throughput.py's: random ids (numpy seed 0), batch x (prompt +
completion) tokens per row, no padding. The dataset is pre-tokenized with a `completion_mask`
column and completion_only_loss=True, so TRL's own preparation sets the prompt labels to -100:
the loss covers the completion tokens only, as ours. LoRA r16 alpha 32 dropout 0 on the 7
projections, AdamW lr 1e-4 (constant), no bf16, gradient checkpointing only with --grad-ckpt
(TRL's default is on; ours is off unless --remat; transformers 5 names it activation_checkpointing). One untimed warm-up step, then --steps timed.

Usage (peers venv): benchmarks/peers/.venv/bin/python benchmarks/peers/trl_sft.py [--batch 4]
  [--prompt 256] [--completion 512] [--steps 3] [--grad-ckpt]
"""

from __future__ import annotations

import argparse
import tempfile

import _peer
import numpy as np


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt", type=int, default=256)
  ap.add_argument("--completion", type=int, default=512)
  ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
  ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (ours: --remat)")
  return ap.parse_args(argv)


def _dataset(a, vocab: int):
  """The rows of sft_throughput.py's batch (same generator calls, so the same ids), with their loss mask."""
  from datasets import Dataset

  rng = np.random.default_rng(0)
  prompt = rng.integers(0, vocab, (a.batch, a.prompt), dtype=np.int32)
  completion = rng.integers(0, vocab, (a.batch, a.completion), dtype=np.int32)
  ids = np.concatenate([prompt, completion], axis=1).tolist()
  mask = [[0] * a.prompt + [1] * a.completion] * a.batch
  return Dataset.from_dict({"input_ids": ids, "completion_mask": mask})


def _config(a, out_dir: str):
  from trl import SFTConfig

  return SFTConfig(
      output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
      logging_steps=1, disable_tqdm=True, seed=0, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
      max_steps=a.steps + 1, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
      activation_checkpointing=a.grad_ckpt, completion_only_loss=True, packing=False,
      max_length=a.prompt + a.completion, dataloader_num_workers=0)


def _count_loss_tokens(trainer) -> list[int]:
  """Wrap compute_loss to record num_items_in_batch: the token count the loss is normalised by."""
  seen, inner = [], trainer.compute_loss

  def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
    seen.append(int(num_items_in_batch) if num_items_in_batch is not None else -1)
    return inner(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

  trainer.compute_loss = compute_loss
  return seen


def run(a) -> dict:
  import torch
  from trl import SFTTrainer

  versions = _peer.print_versions("trl_sft")
  torch.manual_seed(0)
  model, tok = _peer.load_model(), _peer.load_tokenizer()
  clock = _peer.StepClock()
  trainer = SFTTrainer(model=model, args=_config(a, tempfile.mkdtemp(prefix="trl_sft_")),
                       train_dataset=_dataset(a, model.config.vocab_size), processing_class=tok,
                       peft_config=_peer.lora_config(), callbacks=[clock.callback()])
  n_lora = _peer.trainable_params(trainer.model)
  labels = trainer.train_dataset["labels"]
  masked = [sum(x != -100 for x in row) for row in labels]
  print(f"[trl_sft] LoRA trainable parameters {n_lora:,} (ours {_peer.OURS_LORA_PARAMS:,}); rows of "
        f"{[len(r) for r in labels]} tokens, labelled (not -100) per row {masked}; optimizer {trainer.args.optim.value}",
        flush=True)
  loss_tokens = _count_loss_tokens(trainer)
  trainer.train()
  if len(clock.times) != a.steps + 1:
    raise RuntimeError(f"expected {a.steps + 1} steps, timed {len(clock.times)}")
  losses = [x["loss"] for x in clock.logs if "loss" in x]
  return {"versions": versions, "lora_params": n_lora, "labelled_per_row": masked, "loss_tokens": loss_tokens,
          "first_step_s": clock.times[0], "times": clock.times[1:], "losses": losses,
          "grad_ckpt": bool(trainer.args.gradient_checkpointing), "optim": str(trainer.args.optim.value)}


def report(r: dict, a) -> dict:
  s = _peer.median(r["times"])
  tokens = a.batch * (a.prompt + a.completion)
  out = {"side": "trl_sft", "s_step": s, "tok_s": tokens / s, "rss_gib": _peer.peak_rss_gib(),
         "shape": f"{a.batch} x {a.prompt + a.completion} ({a.prompt} + {a.completion})", **r}
  print(f"[trl_sft] shape {out['shape']} tokens, grad ckpt {r['grad_ckpt']}; warm-up step {r['first_step_s']:.1f} s")
  print(f"[trl_sft] step {s:.2f} s (median of {len(r['times'])}: {', '.join(f'{t:.2f}' for t in r['times'])}), "
        f"{out['tok_s']:.0f} tok/s; loss over {r['loss_tokens']} tokens per step "
        f"(completion tokens: {a.batch * a.completion})")
  print(f"[trl_sft] peak RSS {out['rss_gib']:.2f} GiB; losses {', '.join(f'{x:.3f}' for x in r['losses'])}")
  return out


def main(argv=None):
  a = _args(argv)
  _peer.emit(report(run(a), a))


if __name__ == "__main__":
  main()
