"""GRPO throughput on the reference shape: 4 prompts x G=4 samples x 512 new tokens, SmolLM2-135M f32,
LoRA r16 alpha 32 on 7 projections; ours against Tunix 0.1.7 on the same model, prompts and shapes.
Reference on this machine: TRL GRPOTrainer, G=4, 512-token completions, ~72 s/step (target: 3x).

Each side runs in its own subprocess so its peak RSS is its own, and prints three things:
  1. rollout: `sampler.generate(group=G)` (ours: each prompt prefilled once) against
     `tunix.generate.sampler.Sampler` (each of the prompts x G rows prefilled), base weights,
     temperature / top-k / top-p from grpo.sampling, a fresh seed per call, the first call compiling.
     Against the memory-bandwidth ceiling of decode: every step streams all weights once,
     so rows x copy bandwidth / weight bytes tokens/s (ours process measures the bandwidth).
  2. a GRPO step through our trainer (`grpo.build` + `Trainer.step`, grpo.init=base):
     rollout / reference / train seconds and tokens/s; then the same config through Tunix's
     GRPOLearner (RLCluster, vanilla rollout, qwix LoRA, reference = the same base arrays).
  3. ours / Tunix per step and per part, and ours against TRL's ~72 s/step.
Both sides generate exactly prompts x G x new-tokens tokens: EOS is an id past the vocabulary
and ours has no stop strings, so every completion runs to the cap (the same work, whatever the
samples). A GRPO step's first run compiles and is not timed; the figures are the median of --steps.
A side whose train step would not fit in MemAvailable is not started (exit 3; --no-mem-guard).

Known differences on the Tunix side, measured as they are (none changes the work per step):
  - its vanilla rollout samples with RolloutConfig.seed, default None -> PRNGKey(0) on every
    call: each GRPO step draws the same samples for the same prompts (not "fixed" here);
  - its llama3 attention ignores config.rope_theta (always 1e6; SmolLM2 wants 1e5), so its
    logits are off (see sft_throughput.py's check), with the same FLOPs;
  - it pads with the tokenizer's pad id and treats that id as padding everywhere; SmolLM2 pads
    with <|im_end|>, which closes every chat turn, so Tunix is given pad <|endoftext|>.

Usage: python benchmarks/grpo_throughput.py [--steps 2] [--new-tokens 512] [--prompts 4] [--only ours|tunix]
       python benchmarks/grpo_throughput.py --new-tokens 64 --steps 1     # smoke run, a few minutes
"""

import argparse
import dataclasses
import itertools
import os
import sys
import tempfile
import time

import numpy as np
from _sides import emit, mem_guard, peak_rss_gib, run_side, throwaway_compile_cache

TRL_S_STEP = 72.0
TARGET_VS_TRL = 3.0


def _args(argv=None):
  ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  ap.add_argument("--steps", type=int, default=2, help="timed GRPO steps after the compiling one")
  ap.add_argument("--reps", type=int, default=1, help="timed rollout calls after the compiling one")
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--new-tokens", type=int, default=512)
  ap.add_argument("--prompt-tokens", type=int, default=160, help="data.max_prompt_tokens: the padded prompt length")
  ap.add_argument("--beta", type=float, default=0.04, help="grpo.beta: KL weight (0 skips the reference pass)")
  ap.add_argument("--remat", default="none", choices=("none", "dots", "full"),
                  help="ours: model.remat (full matches TRL's gradient checkpointing)")
  ap.add_argument("--only", choices=("both", "ours", "tunix"), default="both",
                  help="run one side in this process (default: both, each in a subprocess)")
  ap.add_argument("--no-mem-guard", action="store_true",
                  help="run a side even when XLA's buffer estimate exceeds MemAvailable")
  return ap.parse_args(argv)


def _config(a, out_dir: str):
  from tpu_reason import config_io
  from tpu_reason.config import Config

  return config_io.load(Config, None, [
      f"output_dir={out_dir}", "model.spec=smollm2-135m", "model.dtype=float32", "grpo.init=base",
      f"grpo.prompts={a.prompts}", f"grpo.group={a.group}", f"grpo.sampling.max_new_tokens={a.new_tokens}",
      f"grpo.steps={a.steps + 1}", "grpo.optim.warmup_steps=0", "grpo.micro_batch=1", f"grpo.beta={a.beta}",
      f"data.max_prompt_tokens={a.prompt_tokens}", f"data.size={max(64, a.prompts * (a.steps + 1))}",
      "data.eval_size=0", f"model.remat={a.remat}"])


def _no_eos(model_cfg) -> int:
  """An id no sampler can draw: nothing stops before the length cap."""
  return model_cfg.vocab_size


def _timed_calls(fn, reps: int) -> tuple[float, list[float], list[int]]:
  """fn(seed) -> generated token count; (compile + first call s, timed call seconds, token counts)."""
  t = time.perf_counter()
  fn(0)
  first = time.perf_counter() - t
  times, counts = [], []
  for seed in range(1, reps + 1):
    t = time.perf_counter()
    counts.append(fn(seed))
    times.append(time.perf_counter() - t)
  return first, times, counts


def _step_result(parts: list[dict], rows: int, prompt_len: int, new_tokens: int) -> dict:
  """Median seconds of each part over the timed steps (the first one compiled) and tokens/s."""
  timed = parts[1:]
  med = {k: float(np.median([p[k] for p in timed])) for k in ("rollout", "reference", "train", "total")}
  seq = rows * (prompt_len + new_tokens)  # tokens the reference / train passes run over (padded shape)
  return {"first_step_s": parts[0]["total"], "steps": timed, **{f"{k}_s": v for k, v in med.items()},
          "rollout_tok_s": rows * new_tokens / med["rollout"], "reference_tok_s": seq / med["reference"],
          "train_tok_s": seq / med["train"]}


# --------------------------------------------------------------------------- ours


def run_ours(a) -> dict:
  import jax
  from bench_generate import copy_bandwidth

  from tpu_reason import grpo
  from tpu_reason import lora as lora_lib
  from tpu_reason import train as train_lib
  from tpu_reason.sampling import sampler

  out_dir = tempfile.mkdtemp(prefix="grpo_bench_")
  cfg = _config(a, out_dir)
  g = cfg.grpo
  tr = grpo.build(cfg)
  no_eos = _no_eos(tr.model.cfg)
  tr = dataclasses.replace(tr, model=dataclasses.replace(tr.model, eos_ids=(no_eos,)),
                           schema=dataclasses.replace(tr.schema, stop_strings=()))
  batches = list(itertools.islice(tr.batches(0), a.steps + 1))
  first = batches[0]
  rows, plen = g.prompts * g.group, first.arrays.prompt_tokens_BxP.shape[1]
  print(f"[ours] prompts {first.id}: {first.arrays.prompt_mask_BxP.sum(1).tolist()} real of {plen} tokens")

  # 1. rollout: the sampler alone on the base weights
  m = tr.model

  def rollout(seed: int) -> int:
    gen = sampler.generate(tr.params, m.cfg, m.tokenizer, first.arrays.prompt_tokens_BxP,
                           first.arrays.prompt_mask_BxP, eos_ids=(no_eos,), pad_id=m.pad_id, sampling=g.sampling,
                           key=jax.random.key(seed), group=g.group)
    return int(gen.lengths.sum())

  r_first, r_times, r_counts = _timed_calls(rollout, a.reps)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(tr.params))
  bandwidth = copy_bandwidth()

  # 2. GRPO steps through the trainer
  lora = lora_lib.init(m.cfg, cfg.lora, jax.random.key(cfg.train.seed))  # f32, as the trainers keep it
  state = jax.device_put(train_lib.init_state(lora, tr.optimizer, cfg.train.seed), tr.state_sharding)
  parts = []
  with throwaway_compile_cache():
    est = _ours_xla_memory(tr, state, g.mini * g.group, plen, g.sampling.max_new_tokens)
    mem_guard("ours", est, not a.no_mem_guard)
    for step, batch in enumerate(batches):
      t = time.perf_counter()
      state, metrics, _ = tr.step(state, batch, step)
      jax.block_until_ready(state)
      parts.append({"total": time.perf_counter() - t, "rollout": metrics["time/rollout"],
                    "decode_weights": metrics["time/decode_weights"],
                    "reference": metrics["time/reference"], "train": metrics["time/train"]})
      print(f"[ours] step {step}: {_fmt_parts(parts[-1])}, reward {metrics['reward']:.3f}, "
            f"kl {metrics['kl']:.4f}", flush=True)
  return {"rollout": {"first_s": r_first, "times": r_times, "tokens": r_counts},
          "weight_bytes": weight_bytes, "bandwidth_gb_s": bandwidth, "rows": rows, "prompt_len": plen,
          "grpo": _step_result(parts, rows, plen, g.sampling.max_new_tokens), "xla": est}


def _ours_xla_memory(tr, state, rows: int, prompt_len: int, new_tokens: int) -> dict[str, int]:
  """XLA's buffer sizes (bytes) for one optimizer update of the trainer on `rows` sequences."""
  from tpu_reason.data.batch import RolloutBatch

  f32 = np.float32
  mb = RolloutBatch(np.zeros((rows, prompt_len), np.int32), np.ones((rows, prompt_len), bool),
                    np.zeros((rows, new_tokens), np.int32), np.ones((rows, new_tokens), bool),
                    advantages_B=np.zeros(rows, f32), num_tokens_B=np.ones(rows, f32),
                    old_logp_BxC=np.zeros((rows, new_tokens), f32), ref_logp_BxC=np.zeros((rows, new_tokens), f32),
                    sampler_logp_BxC=np.zeros((rows, new_tokens), f32))
  ma = tr.step_fn.lower(state, tr.params, tr.place(mb)).compile().memory_analysis()
  return {"temp": ma.temp_size_in_bytes, "args": ma.argument_size_in_bytes, "out": ma.output_size_in_bytes}


# --------------------------------------------------------------------------- Tunix


def run_tunix(a) -> dict:
  import _tunix  # benchmarks/_tunix.py; imported here so the `ours` process never loads Tunix

  from tpu_reason import grpo, models, rewards, tags
  from tpu_reason import mesh as mesh_lib, sharding as sharding_lib
  from tpu_reason.data import loader

  cfg = _config(a, tempfile.mkdtemp(prefix="grpo_bench_"))
  g = cfg.grpo
  m = models.load(cfg.model.spec)
  train, _, _ = grpo.load_prompts(cfg, m)
  # the batches our trainer draws (Trainer.batches without a curriculum)
  batches = list(itertools.islice(loader.batches(train, g.prompts, seed=cfg.train.seed), a.steps + 1))
  first = batches[0]
  rows, plen = g.prompts * g.group, first.arrays.prompt_tokens_BxP.shape[1]
  no_eos = _no_eos(m.cfg)
  tok = _tunix.tokenizer_with_pad(m.tokenizer, "<|endoftext|>")
  mesh = mesh_lib.make_mesh(cfg.mesh)
  base = _tunix.place_replicated(_tunix.load_llama3(m.params, m.cfg), sharding_lib.replicated(mesh))
  m.params = None
  texts = [_prompt_text(tok, t, k) for t, k in zip(first.arrays.prompt_tokens_BxP,
                                                    first.arrays.prompt_mask_BxP)]
  print(f"[tunix] prompts {first.id}: {first.arrays.prompt_mask_BxP.sum(1).tolist()} real of {plen} tokens")

  # 1. rollout: Tunix's Sampler on the base model, each prompt repeated G times
  smp = _tunix.sampler(base, tok, cache_size=plen + g.sampling.max_new_tokens)
  same_ids = all(np.array_equal(smp.tokenize(s), t[k]) for s, t, k in
                 zip(texts, first.arrays.prompt_tokens_BxP, first.arrays.prompt_mask_BxP))
  print(f"[tunix] Sampler re-tokenizes the prompt texts to our ids: {same_ids}")
  group_texts = [s for s in texts for _ in range(g.group)]

  def rollout(seed: int) -> int:
    out = smp(group_texts, max_generation_steps=g.sampling.max_new_tokens, max_prompt_length=plen,
              temperature=g.sampling.temperature, top_p=g.sampling.top_p, top_k=g.sampling.top_k or None, seed=seed,
              eos_tokens=[no_eos])
    return sum(len(t) for t in out.tokens)

  r_first, r_times, r_counts = _timed_calls(rollout, a.reps)

  # 2. GRPO steps through GRPOLearner
  schema, weights = tags.get_schema(cfg.data.schema), dict(zip(g.rewards, g.reward_weights))
  meta = [row for b in batches for row in zip(b.prompt_text, b.answer, b.checkpoints)]

  def reward(prompts, completions, row, **_):
    """Our three rewards on Tunix's completions, exactly as our trainer scores its own."""
    r = [meta[i] for i in row]
    total, _ = rewards.score([x[0] for x in r], [schema.primer + c for c in completions], weights,
                             answer=[x[1] for x in r], checkpoints=[x[2] for x in r], schema=schema.name)
    return total

  actor = _tunix.apply_lora(base, rank=cfg.lora.rank, alpha=cfg.lora.alpha)
  learner = _tunix.grpo(actor, base, tok, mesh, g, prompt_len=plen, steps=a.steps + 1, eos_ids=[no_eos],
                        reward_fn=reward)
  info = _tunix.grpo_setup(learner)
  print(f"[tunix] actor / reference share the base arrays: {info['shares_backbone']}; "
        f"rollout seed {info['rollout_seed']} (None: PRNGKey(0) on every step)")
  dataset = [{"prompts": [_prompt_text(tok, t, k)
                          for t, k in zip(b.arrays.prompt_tokens_BxP, b.arrays.prompt_mask_BxP)],
              "row": np.arange(i * g.prompts, (i + 1) * g.prompts)} for i, b in enumerate(batches)]
  with throwaway_compile_cache():
    t = time.perf_counter()
    est = _tunix.grpo_xla_memory(learner, g.micro_batch * g.group, plen, g.sampling.max_new_tokens)
    print(f"[tunix] AOT compile for the memory estimate {time.perf_counter() - t:.1f} s", flush=True)
    mem_guard("tunix", est, not a.no_mem_guard)
    clock = _tunix.GrpoClock(learner)
    learner.train(dataset)
  for step, p in enumerate(clock.steps):
    print(f"[tunix] step {step}: {_fmt_parts(p)}")
  if len(clock.steps) != a.steps + 1:
    raise RuntimeError(f"expected {a.steps + 1} GRPOLearner steps, timed {len(clock.steps)}")
  return {"rollout": {"first_s": r_first, "times": r_times, "tokens": r_counts}, "rows": rows, "prompt_len": plen,
          "grpo": _step_result(clock.steps, rows, plen, g.sampling.max_new_tokens), "xla": est, **info}


def _prompt_text(tokenizer, tokens_P: np.ndarray, mask_P: np.ndarray) -> str:
  """The rendered prompt (chat template + primer) of one of our left-padded prompt rows."""
  return tokenizer.decode(tokens_P[mask_P].tolist(), skip_special_tokens=False)


# --------------------------------------------------------------------------- report


def _fmt_parts(p: dict) -> str:
  return ", ".join(f"{k} {p[k]:.1f} s" for k in ("total", "rollout", "reference", "train") if k in p)


def report(side: str, r: dict, a) -> dict:
  ro, gr = r["rollout"], r["grpo"]
  want = r["rows"] * a.new_tokens
  if any(n != want for n in ro["tokens"]):
    raise RuntimeError(f"[{side}] rollout generated {ro['tokens']} tokens, expected {want} each call")
  dt = float(np.median(ro["times"]))
  out = {"side": side, "sampler_s": dt, "sampler_tok_s": want / dt, "sampler_first_s": ro["first_s"],
         "rss_gib": peak_rss_gib(), "xla_temp_gib": r["xla"]["temp"] / 2**30,
         **{k: v for k, v in r.items() if k not in ("rollout", "grpo", "xla")}, **gr}
  print(f"[{side}] sampler alone, {r['rows']} x {a.new_tokens} tokens (prompt {r['prompt_len']}): {dt:.1f} s = "
        f"{out['sampler_tok_s']:.0f} tok/s, {1000 * dt / a.new_tokens:.0f} ms/step "
        f"(median of {len(ro['times'])}; first call incl. compile {ro['first_s']:.1f} s)")
  print(f"[{side}] GRPO step (median of {len(gr['steps'])}): {gr['total_s']:.1f} s = rollout {gr['rollout_s']:.1f} "
        f"({gr['rollout_tok_s']:.0f} tok/s) + reference {gr['reference_s']:.1f} ({gr['reference_tok_s']:.0f} tok/s) "
        f"+ train {gr['train_s']:.1f} ({gr['train_tok_s']:.0f} tok/s) + other "
        f"{gr['total_s'] - gr['rollout_s'] - gr['reference_s'] - gr['train_s']:.1f}; first step (compile) "
        f"{gr['first_step_s']:.1f} s")
  print(f"[{side}] peak RSS {out['rss_gib']:.2f} GiB; XLA temp buffers of the train step "
        f"{out['xla_temp_gib']:.2f} GiB")
  return out


def _child(side: str, a) -> dict | None:
  argv = ["--steps", str(a.steps), "--reps", str(a.reps), "--prompts", str(a.prompts), "--group", str(a.group),
          "--new-tokens", str(a.new_tokens), "--prompt-tokens", str(a.prompt_tokens), "--beta", str(a.beta)] + (
              ["--no-mem-guard"] if a.no_mem_guard else [])
  return run_side(os.path.abspath(__file__), side, argv)


def _cell(r: dict | None, part: str) -> str:
  if r is None:
    return "-"
  return f"{r[f'{part}_s']:.1f}" + (f" ({r[f'{part}_tok_s']:.0f})" if part != "total" else "")


def _table(ours: dict, tunix: dict | None, a) -> None:
  rows = ours["rows"]
  floor = rows * ours["bandwidth_gb_s"] * 1e9 / ours["weight_bytes"]
  print(f"\nrollout, {a.prompts} prompts x G={a.group} x {a.new_tokens} new tokens, SmolLM2-135M f32:")
  print(f"  bandwidth ceiling: {ours['weight_bytes'] / 1e9:.2f} GB of weights per decode step at "
        f"{ours['bandwidth_gb_s']:.1f} GB/s copy -> {floor:.0f} tok/s")
  print(f"  ours  {ours['sampler_tok_s']:7.0f} tok/s = {ours['sampler_tok_s'] / floor:.0%} of the ceiling")
  if tunix:
    print(f"  tunix {tunix['sampler_tok_s']:7.0f} tok/s = {tunix['sampler_tok_s'] / floor:.0%} of the ceiling "
          f"-> ours {ours['sampler_tok_s'] / tunix['sampler_tok_s']:.2f}x Tunix")
  print(f"\nGRPO step, same config (seconds, median of {a.steps}; tok/s in brackets):")
  print(f"{'':14s}{'ours':>16s}{'tunix':>16s}{'tunix/ours':>12s}")
  for part in ("rollout", "reference", "train", "total"):
    ratio = f"{tunix[f'{part}_s'] / ours[f'{part}_s']:.2f}x" if tunix else "-"
    print(f"{part:14s}{_cell(ours, part):>16s}{_cell(tunix, part):>16s}{ratio:>12s}")
  for key, label, fmt in (("rss_gib", "peak RSS GiB", "{:.2f}"), ("first_step_s", "1st step s", "{:.1f}")):
    print(f"{label:14s}{fmt.format(ours[key]):>16s}{fmt.format(tunix[key]) if tunix else '-':>16s}")
  s = ours["total_s"]
  if tunix:
    print(f"ours vs Tunix's GRPOLearner: {tunix['total_s'] / s:.2f}x its speed per step (Tunix s/step / ours)")
  if a.new_tokens == 512 and a.group == 4:
    print(f"vs TRL GRPOTrainer (~{TRL_S_STEP:.0f} s/step on this machine): {TRL_S_STEP / s:.2f}x "
          f"(target >= {TARGET_VS_TRL:.0f}x, i.e. <= {TRL_S_STEP / TARGET_VS_TRL:.0f} s/step)")


def main(argv=None):
  a = _args(argv)
  if a.only in ("ours", "tunix"):
    r = (run_ours if a.only == "ours" else run_tunix)(a)
    emit(report(a.only, r, a))
    return
  ours, tunix = _child("ours", a), _child("tunix", a)
  if ours is None:
    print("\nno figures: our side did not run (see above)")
    sys.exit(1)
  _table(ours, tunix, a)
  if tunix is None:
    print("(Tunix side did not run, see above)")
    sys.exit(1)


if __name__ == "__main__":
  main()
