"""The one training loop that SFT and GRPO plug into.

A trainer supplies its steps (`Algorithm`); the loop does everything around them, once:
joining `jax.distributed`, the mesh context, resume, held-out evals before / during / after,
checkpoint cadence, the non-finite stop, the session budget (`train.max_minutes`), a save on
any crash or Ctrl-C, metrics, plots and the summary. Every process computes; only process 0
writes files (Orbax coordinates the checkpoint writes of all processes itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp

from tpu_reason import checkpoint, config_io, distributed, lora as lora_lib, runs, train as train_lib
from tpu_reason.config import Config
from tpu_reason.errors import UserError, check_interrupt
from tpu_reason.metrics import MetricsLog, compiles


class NonFinite(UserError):
  """Too many non-finite steps in a row: the run stops on its last finite checkpoint."""


class Algorithm(Protocol):
  """What a trainer hands the loop (see `sft.Trainer`, `grpo.Trainer`)."""

  kind: str  # "sft" | "grpo": run.json, the checkpoints' best metric, the cadence's config section (`cadence`)
  cfg: Config
  out: Path
  init: str  # "base" or the run whose adapter is merged into the weights
  mesh: Any
  params: Any
  model: Any
  optimizer: Any
  state_sharding: Any
  lr_key: str  # the setting to lower when steps go non-finite
  samples_file: str | None  # a JSONL of per-step records (GRPO's rollouts), or None
  plot: tuple[list[tuple[str, str]], str]  # ((split, key) panels, file name)
  # Optional: batches drawn so far, for a trainer whose steps may draw more than one (GRPO's dynamic
  # sampling); `batches(start)` then takes that count. Without it the data position is the step.
  # data_position: int | None

  def batches(self, start: int) -> Iterator[dict]: ...

  def step(self, state, batch: dict, step: int) -> tuple[Any, dict, dict | None]: ...

  def held_out(self, lora, full: bool, before: bool = False) -> dict: ...  # before: the scores of the initial adapters

  def completed(self, state) -> int | None: ...

  def postfix(self, row: dict) -> dict: ...

  def table(self, before: dict, after: dict) -> str: ...


def run(cfg: Config, build: Callable[[Config], Algorithm], kind: str = "") -> dict:
  """Join the multi-host run, build the trainer, train it on its mesh; returns the summary.

  `kind` ("sft" | "grpo") checks an existing `output_dir` before the model loads; the built trainer's
  is checked again in any case (a GRPO init resolved by `build`), before anything is written.
  """
  distributed.initialize()  # before anything touches a device
  if kind and cfg.output_dir:
    runs.check_output_dir(Path(cfg.output_dir), cfg, kind)
  algo = build(cfg)
  runs.check_output_dir(algo.out, algo.cfg, algo.kind)
  check_model(algo.cfg, algo.model.cfg.vocab_size)
  fresh = not algo.out.exists()
  distributed.barrier("output_dir checked")  # before the main process writes into it
  try:
    with jax.set_mesh(algo.mesh):  # activations take their layout from the mesh (sharding.constrain)
      return Loop(algo).run()
  except UserError as e:
    # A run refused before its first checkpoint leaves no half run directory behind (a
    # non-finite stop keeps its metrics: they show where it diverged).
    if fresh and not isinstance(e, NonFinite) and distributed.is_main() and not checkpoint.any_saved(algo.out):
      shutil.rmtree(algo.out, ignore_errors=True)
    raise


def cadence(cfg: Config, kind: str) -> tuple[int, int, int]:
  """(steps, eval_every, save_every) of a `kind` run, from its config section: grpo.* for GRPO, train.* for SFT."""
  if kind == "grpo":
    g = cfg.grpo
    return g.steps, g.eval_every, g.save_every
  t = cfg.train
  return t.max_steps, t.eval_every, t.save_every


def check_model(cfg: Config, vocab: int):
  """Settings that only the loaded model can check: a sampling top_k beyond its vocabulary."""
  top_k = cfg.grpo.sampling.top_k
  if top_k > vocab:
    raise UserError(f"grpo.sampling.top_k={top_k} exceeds the vocabulary of {cfg.model.spec} ({vocab} tokens): "
                    f"set it <= {vocab}, or 0 for no top-k")


def initial_state(a: Algorithm, ckpts: checkpoint.Checkpoints) -> tuple[Any, dict]:
  """Fresh f32 adapters (whatever the model dtype), or the checkpoint `train.resume` names, as saved."""
  t = a.cfg.train
  lora = lora_lib.init(a.model.cfg, a.cfg.lora, jax.random.key(t.seed))
  state = jax.device_put(train_lib.init_state(lora, a.optimizer, t.seed), a.state_sharding)
  step = ckpts.latest_step() if t.resume == "latest" else None if t.resume == "none" else int(t.resume)
  if step is None:
    return state, {}
  state, saved = ckpts.restore(step, state)
  print(f"resumed from {a.out / 'checkpoints' / 'last'} step {step}")
  return state, saved


@contextlib.contextmanager
def interrupt_after_step():
  """Hold a Ctrl-C (or SIGTERM) that lands inside a step until the step's new state is in hand.

  A step donates its input state: interrupted mid-dispatch, neither the old state nor the
  new one would be left to save. A second signal stops at once (the last checkpoint stays).
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  hit = []

  def note(signum, frame):
    if hit:
      raise KeyboardInterrupt
    hit.append(signum)
    print("\ninterrupt: finishing this step so that it can be saved (Ctrl-C again to stop now)", file=sys.stderr)

  check_interrupt()  # one that an earlier GC callback swallowed
  previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if hit:
    raise KeyboardInterrupt


def meta(cfg: Config, step: int, position: int | None = None) -> dict:
  """The JSON saved beside each checkpoint: where the data stream stands (batches drawn: the step unless
  the trainer says otherwise), and the run's config."""
  return {"step": step, "data_position": step if position is None else position, "config": config_io.to_dict(cfg)}


class Loop:
  """One run of an `Algorithm`, from its initial state to its summary."""

  def __init__(self, algo: Algorithm):
    self.algo, self.cfg, self.out = algo, algo.cfg, algo.out
    self.main = distributed.is_main()
    self.log = None  # opened once the initial state is in hand: a refused restore leaves the directory as it was
    self.ckpts = checkpoint.Checkpoints(self.out / "checkpoints", self.cfg.train.keep_last, *runs.BEST[algo.kind])
    self.steps, self.eval_every, self.save_every = cadence(self.cfg, algo.kind)
    self.saved_at = 0
    self.position = 0  # batches drawn after the last whole step: what `batches` resumes from

  def run(self) -> dict:
    a = self.algo
    try:
      state, saved = initial_state(a, self.ckpts)
      self.log = MetricsLog(self.out, write=self.main)
      if self.main:
        config_io.save(self.cfg, self.out)
        runs.write_info(self.out, a.kind, a.init)
      start = saved.get("step", 0)
      self.position = saved.get("data_position", start)
      self.log.truncate(start)  # steps after the checkpoint are run (and logged) again
      print(lora_lib.describe(a.params, state.lora))
      before = self.before(state, start)
      self.saved_at = start
      state, finished = self.train(state, start)
      after = a.held_out(state.lora, full=True) if finished else {}
      if after:
        self.log.log(self.saved_at, after, "eval")  # saved_at: the last step (a finished run saves it)
        self.ckpts.save_best(self.saved_at, state, self.meta(self.saved_at), after)
    except BaseException:
      if self.log is not None:
        self.log.close()  # TensorBoard's buffered events: the CLI then exits without teardown
      raise
    finally:
      self.ckpts.close()
    return self.summary(state, before, after, finished)

  def before(self, state, start: int) -> dict:
    """The held-out scores of the initial adapters, measured once per run (a resume reads them)."""
    path = self.out / "before.json"
    if start and path.exists():
      return json.loads(path.read_text())
    before = self.algo.held_out(state.lora, full=True, before=True)
    if self.main:
      path.write_text(json.dumps(before))
    if before:
      self.log.log(start, before, "eval")
    return before

  def train(self, state, start: int) -> tuple[Any, bool]:
    """Steps `start`..end (or until the session budget runs out): (state, whether all steps ran)."""
    from tqdm.auto import tqdm

    a, t = self.algo, self.cfg.train
    t0 = time.monotonic()
    bar = tqdm(range(start, self.steps), initial=start, total=self.steps, desc=a.kind, dynamic_ncols=True,
               disable=not self.main)
    records = (self.out / a.samples_file).open("a") if a.samples_file and self.main else open(os.devnull, "w")
    done = start
    try:
      with records:
        for step, batch in zip(bar, a.batches(self.position)):
          done = step + 1
          with interrupt_after_step():  # the step and its logs: a saved step keeps its metrics
            with compiles() as compiled:
              state, row, record = a.step(state, batch, step)
            row["compiles"] = compiled.n  # 0 once each shape has been stepped
            drawn = getattr(a, "data_position", None)
            self.position = done if drawn is None else drawn
            self.log.log(done, row)
            if record is not None:
              records.write(json.dumps({"step": done, **record}) + "\n")
              records.flush()
          bar.set_postfix(a.postfix(row))
          if int(state.bad_steps) >= t.max_nonfinite:
            resume = (f"the run resumes from its last checkpoint, step {self.saved_at}" if self.saved_at
                      else "no checkpoint was saved before them")
            raise NonFinite(f"{t.max_nonfinite} non-finite steps in a row at step {done}: lower {a.lr_key} or "
                            f"check the data; {resume} (train.resume=none starts afresh)")
          self.cadence(state, done)
          if t.max_minutes and time.monotonic() - t0 > 60 * t.max_minutes and done < self.steps:
            self.save(state, done)
            print(f"\nstopped after step {done} of {self.steps}: train.max_minutes={t.max_minutes} spent; "
                  f"run the same command again to resume from {self.out / 'checkpoints'}", file=sys.stderr)
            return state, False
    except NonFinite:
      raise  # the diverged steps are not worth keeping: the last checkpoint is the resume point
    except BaseException:
      self.rescue(state)
      raise
    finally:
      bar.close()
    if done < self.steps:  # the trainer's batches ran out first (GRPO's grpo.max_completions)
      if done > self.saved_at:
        self.save(state, done)
      print(f"the run's batches ran out after step {done} of {self.steps} (its sampling budget)")
    return state, True

  def cadence(self, state, done: int):
    """Held-out eval (the final one is the 'after' eval) and checkpoints at their intervals."""
    a = self.algo
    if done % self.eval_every == 0 and done < self.steps:
      ev = a.held_out(state.lora, full=False)
      if ev:
        self.log.log(done, ev, "eval")
        self.ckpts.save_best(done, state, self.meta(done), ev)
    if done % self.save_every == 0 or done == self.steps:
      self.save(state, done)

  def meta(self, done: int) -> dict:
    """`meta` at step `done`, which is the last whole step (its data position is the one `self.position` holds)."""
    return meta(self.cfg, done, self.position)

  def save(self, state, done: int):
    self.ckpts.save(done, state, self.meta(done))
    self.saved_at = done

  def rescue(self, state):
    """On a crash or Ctrl-C: save the last whole step unless it is saved already (nothing lost)."""
    leaves = jax.tree.leaves(state)
    if any(x.is_deleted() for x in leaves if isinstance(x, jax.Array)):
      # the interrupt landed while a step that consumes (donates) the state was dispatched
      print(f"\nthe interrupted step had already taken the adapters; the last checkpoint is step {self.saved_at}",
            file=sys.stderr)
      return
    done = self.algo.completed(state)
    if done is not None and done > self.saved_at and bool(jnp.isfinite(jax.tree.leaves(state.lora)[0]).all()):
      self.save(state, done)
      print(f"\nsaved step {done} to {self.out / 'checkpoints'} before exiting", file=sys.stderr)

  def summary(self, state, before: dict, after: dict, finished: bool) -> dict:
    """summary.json (process 0), the before/after table and where the outputs are."""
    a = self.algo
    keys, filename = a.plot
    plot = self.log.plot(keys, filename, f"{a.kind.upper()} {self.cfg.model.spec}")
    out = {"trainer": a.kind, "init": a.init, "before": before, "after": after, **trend(self.log.history()),
           "output_dir": str(self.out), "plot": str(plot), "best_step": self.ckpts.best_step(),
           "last_step": a.completed(state), "finished": finished}
    self.log.close()
    if self.main:
      (self.out / "summary.json").write_text(json.dumps(out, indent=1))
    if after:
      print(a.table(before, after))
    if "first_20pct_reward" in out:
      print(f"train reward: first 20% of steps {out['first_20pct_reward']:.3f} -> last 20% "
            f"{out['last_20pct_reward']:.3f}")
    print(f"outputs in {self.out} (config.yaml, metrics.jsonl, tb/, checkpoints/, {filename})")
    return out


def trend(history: list[dict], key: str = "reward") -> dict:
  """Mean training `key` over the first and the last 20% of steps (when the trainer logs it)."""
  values = [r[key] for r in history if r["split"] == "train" and key in r]
  if not values:
    return {}
  n = max(1, len(values) // 5)
  return {"first_20pct_reward": sum(values[:n]) / n, "last_20pct_reward": sum(values[-n:]) / n}


def table(before: dict, after: dict, keys: list[str], name: str = "") -> str:
  """Held-out scores before and after training, one row per key both have; the header says on how many rows
  (and of which task, `name`)."""
  keys = [k for k in keys if k in before and k in after and k != "rows"]
  title = " ".join(filter(None, ["held-out", name, f"({after['rows']} rows)" if "rows" in after else ""]))
  width = max([24, len(title) + 2] + [len(k) + 2 for k in keys])
  lines = [f"{title:<{width}}{'before':>10}{'after':>10}"]
  lines += [f"{k:<{width}}{before[k]:>10.3f}{after[k]:>10.3f}" for k in keys]
  return "\n".join(lines)
