"""Peer decode: transformers `model.generate` on SmolLM2-135M f32, CPU torch; same work as bench_generate.py.

Prompts: bench_generate.py's PROMPTS (repeated to --prompts), chat-templated with the assistant
turn open, left-padded to the longest. Sampling as ours: temperature 1.0, top-k 50, top-p 1.0,
--group samples per prompt (num_return_sequences). min_new_tokens = max_new_tokens = --new, so
every row decodes exactly --new tokens (ours has no EOS: the same work). KV cache on. One untimed
warm-up call with a few tokens, then --reps timed calls.

Usage (peers venv): benchmarks/peers/.venv/bin/python benchmarks/peers/hf_generate.py [--prompts 4]
  [--group 4] [--new 512] [--reps 1]
"""

from __future__ import annotations

import argparse
import time

import _peer


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--new", type=int, default=512)
  ap.add_argument("--reps", type=int, default=1, help="timed calls after the warm-up call")
  return ap.parse_args(argv)


def _inputs(tok, n: int):
  tok.padding_side = "left"
  texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
           for p in (_peer.bench_prompts() * 4)[:n]]
  # the template already holds every special token: add none (ours encodes with add_special_tokens=False too)
  return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _generate(model, tok, enc, group: int, new: int, seed: int) -> tuple[float, int]:
  """One timed `generate` call: (seconds, tokens generated); checks every row made exactly `new`."""
  import torch

  torch.manual_seed(seed)
  t = time.perf_counter()
  with torch.inference_mode():
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=50, top_p=1.0, num_return_sequences=group,
                         max_new_tokens=new, min_new_tokens=new, use_cache=True, pad_token_id=tok.pad_token_id)
  seconds = time.perf_counter() - t
  gen = out[:, enc["input_ids"].shape[1]:]
  rows, made = gen.shape
  # an EOS (= pad here) inside a row would mean that row stopped early and was padded: less work than ours
  stopped = int(torch.isin(gen, torch.tensor([tok.eos_token_id, tok.pad_token_id])).any(1).sum())
  if rows != enc["input_ids"].shape[0] * group or made != new or stopped:
    raise RuntimeError(f"generate returned {rows} rows x {made} new tokens ({stopped} stopped early), expected "
                       f"{enc['input_ids'].shape[0] * group} x {new}")
  return seconds, rows * made


def run(a) -> dict:
  versions = _peer.print_versions("hf_generate")
  model, tok = _peer.load_model(), _peer.load_tokenizer()
  model.eval()
  enc = _inputs(tok, a.prompts)
  real = enc["attention_mask"].sum(1).tolist()
  print(f"[hf_generate] prompts {real} real tokens, left-padded to {enc['input_ids'].shape[1]}", flush=True)
  warm_s, _ = _generate(model, tok, enc, a.group, 8, seed=0)
  times, tokens = [], []
  for rep in range(a.reps):
    s, n = _generate(model, tok, enc, a.group, a.new, seed=rep + 1)
    times.append(s)
    tokens.append(n)
  return {"versions": versions, "prompt_tokens": real, "padded_prompt": int(enc["input_ids"].shape[1]),
          "warmup_s": warm_s, "times": times, "tokens": tokens}


def report(r: dict, a) -> dict:
  s = _peer.median(r["times"])
  rows = a.prompts * a.group
  n = r["tokens"][0]
  out = {"side": "hf_generate", "rows": rows, "new_tokens": a.new, "seconds": s, "tok_s": n / s,
         "ms_step": 1000 * s / a.new, "rss_gib": _peer.peak_rss_gib(), **r}
  print(f"[hf_generate] {rows} sequences x {a.new} new tokens (prompts {a.prompts} x group {a.group}); "
        f"warm-up call (8 tokens) {r['warmup_s']:.1f} s")
  print(f"[hf_generate] decode: {n} tokens in {s:.1f} s = {out['tok_s']:.0f} tok/s ({out['ms_step']:.0f} ms/step; "
        f"median of {len(r['times'])}: {', '.join(f'{t:.1f}' for t in r['times'])} s)")
  print(f"[hf_generate] peak RSS {out['rss_gib']:.2f} GiB")
  return out


def main(argv=None):
  a = _args(argv)
  _peer.emit(report(run(a), a))


if __name__ == "__main__":
  main()
