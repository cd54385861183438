"""`python -m tpu_reason.chat [--model SPEC_OR_RUN_DIR] [--hide-thoughts] [key=value ...]`: talk to a model.

Each line on stdin is a user turn, rendered with the conversation so far through the
model's chat template and the tag schema's primer; the reply streams as it is generated.
`--hide-thoughts` prints only the parsed answer; `redact_thoughts=true` prints the reply with
its reasoning replaced by its length. Budget forcing: `--max-thinking-tokens N`,
`--extend N`, `--wait STR` (the budget.* keys). A run directory loads its LoRA and its
config (schema, system prompt). `/reset` forgets the conversation; `/quit` or end of input
exits, so `echo "What is 7*8?" | python -m tpu_reason.chat` works as a one-shot.
"""

from __future__ import annotations

import dataclasses
import sys

import jax.numpy as jnp

from tpu_reason import config_io, mesh as mesh_lib, policy, tags
from tpu_reason.config import Config
from tpu_reason.errors import cli
from tpu_reason.sampling import batched, layout, sampler
from tpu_reason.sampling.stream import Streamer

FLAGS = {"--model": "model", "--hide-thoughts": "hide_thoughts?", "--system": "data.system_prompt",
         "--max-thinking-tokens": "budget.max_thinking_tokens", "--extend": "budget.extend", "--wait": "budget.wait",
         "--max-new-tokens": "sampling.max_new_tokens", "--temperature": "sampling.temperature",
         "--seed": "sampling.seed"}


@dataclasses.dataclass
class Session:
  """One conversation with one model: weights on device, settings, the turns so far."""

  policy: policy.Policy
  weights: layout.Weights  # what generation reads: the merged decode copy, or the training layout
  schema: tags.TagSchema
  cfg: Config
  history: list[dict] = dataclasses.field(default_factory=list)

  def reset(self):
    system = self.cfg.data.system_prompt
    self.history = [{"role": "system", "content": system}] if system else []

  def reply(self, user: str, out, hide: bool = False) -> sampler.Generation:
    """Generate the assistant turn for `user`, writing it to `out` as it streams."""
    model, schema = self.policy.model, self.schema
    messages = self.history + [{"role": "user", "content": user}]
    ids = model.encode(model.chat_prompt(messages, primer=schema.primer))
    # a growing conversation recompiles only when its prompt crosses a `sampler.prompt_width`, not every turn
    tokens, mask = sampler.left_pad([ids], sampler.prompt_width(len(ids)), model.pad_id)
    live = not hide and not self.cfg.redact_thoughts
    stream = Streamer(model.tokenizer, out) if live else None
    if live:
      out.write(schema.primer)
    gen = sampler.generate(self.weights.params, model.cfg, model.tokenizer, tokens, mask, eos_ids=model.eos_ids,
                           sampling=self.cfg.sampling, **self.weights.kwargs(),
                           stop_strings=schema.stop_strings, chunk=8, on_chunk=stream,
                           dtype=jnp.dtype(self.cfg.model.dtype), pad_id=model.pad_id,
                           **batched.budget_kwargs(self.cfg.budget, schema))
    text = schema.primer + gen.texts[0]
    if live:
      stream.write(gen.texts[0])
    elif hide:
      answer = schema.parse(text).answer
      out.write(answer if answer is not None else "(no answer: the reasoning did not close)")
    else:
      out.write(schema.redact(text))
    out.write("\n")
    out.flush()
    self.history = messages + [{"role": "assistant", "content": text}]
    return gen


def open_session(cfg: Config, spec: str) -> Session:
  """Load `spec` (model spec or run dir) onto the mesh and start an empty conversation."""
  pol = policy.load(spec, cfg.model.dtype)
  policy.check_top_k(cfg.sampling, "sampling", pol.model)
  w = policy.decode_weights(pol, mesh_lib.make_mesh(cfg.mesh), cfg.model.dtype, cfg.mesh.decode_layout)
  session = Session(pol, w, tags.get_schema(cfg.data.schema), cfg)
  session.reset()
  return session


def run(cfg: Config, spec: str, hide: bool = False, stdin=sys.stdin, out=sys.stdout, err=sys.stderr) -> Session:
  """The REPL: one reply per input line until /quit or end of input."""
  session = open_session(cfg, spec)
  interactive = stdin.isatty()
  print(f"chat with {session.policy.source} (schema {session.schema.name}); /reset forgets, /quit exits",
        file=err)
  while True:
    if interactive:
      err.write("> ")
      err.flush()
    line = stdin.readline()
    if not line or line.strip() == "/quit":
      break
    line = line.strip()
    if line == "/reset":
      session.reset()
      print("(conversation cleared)", file=err)
    elif line:
      gen = session.reply(line, out, hide)
      stop = "end of turn" if gen.finished[0] else "length cap"
      print(f"[{gen.lengths[0]} tokens, {gen.tokens_per_second:.1f} tok/s, {stop}]", file=err)
  return session


@cli
def main(argv: list[str] | None = None):
  argv = sys.argv[1:] if argv is None else argv
  _, flags = config_io.parse_args(Config, argv, FLAGS)
  specs = [flags["model"]] if flags.get("model") else []
  cfg, flags = config_io.parse_args(Config, policy.with_run_config(argv, specs), FLAGS)
  hide = flags.get("hide_thoughts", "false") == "true"
  run(cfg, flags.get("model") or cfg.model.spec, hide)


if __name__ == "__main__":
  main()
