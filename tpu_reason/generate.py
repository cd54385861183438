"""`python -m tpu_reason.generate --model smollm2-135m --prompt "What is 7 times 8?"`.

Streams the completion through the model's chat template and reports tokens/s.
Also takes `--config recipes/X.yaml` and `key.sub=value` overrides (e.g. sampling.temperature=0.7).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from tpu_reason import config, config_io, mesh as mesh_lib, models
from tpu_reason.errors import UserError, cli
from tpu_reason.sampling import layout, sampler
from tpu_reason.sampling.stream import Streamer

FLAGS = {"--model": "model.spec", "--max-new-tokens": "sampling.max_new_tokens",
         "--temperature": "sampling.temperature", "--seed": "sampling.seed",
         "--prompt": "prompt", "--raw": "raw?"}


def _parse(argv: list[str]):
  cfg, flags = config_io.parse_args(config.Config, argv, extra=FLAGS)
  if not flags.get("prompt"):
    raise UserError('--prompt "..." is required')
  return cfg, flags["prompt"], flags.get("raw", "false").lower() in ("1", "true", "yes")


def run(cfg: config.Config, prompt: str, raw: bool = False, out=sys.stdout) -> sampler.Generation:
  """Load the model, generate for one prompt, stream text to `out`."""
  model = models.load_for(cfg.model)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  params = models.place_params(model.params, model.cfg, mesh, jnp.dtype(cfg.model.dtype))
  w, note = layout.build(params, None, model.cfg, mesh, lora_scale=1.0, dtype=cfg.model.dtype,
                         mode=cfg.mesh.decode_layout)
  del params  # the decode copy replaces them (or is them, on the training layout)
  if note:
    print(note, file=sys.stderr)
  text = prompt if raw or not model.tokenizer.chat_template else model.chat_prompt(prompt)
  ids = model.encode(text)
  tokens, mask = sampler.left_pad([ids], sampler.prompt_width(len(ids)), model.pad_id)
  stream = Streamer(model.tokenizer, out)
  with jax.set_mesh(mesh):
    gen = sampler.generate(w.params, model.cfg, model.tokenizer, tokens, mask, eos_ids=model.eos_ids,
                           sampling=cfg.sampling, chunk=8, on_chunk=stream, dtype=jnp.dtype(cfg.model.dtype),
                           pad_id=model.pad_id)
  stream.write(gen.texts[0])
  out.write("\n")
  reason = "eos" if gen.finished[0] else "length cap"
  print(f"[{gen.lengths[0]} tokens, {gen.tokens_per_second:.1f} tok/s incl. compile, stopped by {reason}]",
        file=sys.stderr)
  return gen


@cli
def main(argv: list[str] | None = None):
  cfg, prompt, raw = _parse(sys.argv[1:] if argv is None else argv)
  run(cfg, prompt, raw)


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
