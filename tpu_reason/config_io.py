"""Configs in and out: YAML recipes, `a.b=value` overrides, the command line, saved runs.

Every CLI: `--config NAME|FILE.yaml key.sub=value ...`. NAME is a recipe shipped inside the
package (`tpu_reason.recipes`, the repo's recipes/ folder mapped in by pyproject.toml), so
it works from an installed wheel anywhere; `--list-recipes` lists them. Unknown keys and bad
values are `UserError`s (one line, no traceback), a file's naming its line; keys that moved
since (MOVED) still load, with a note. The resolved config is printed and saved as YAML.
The sections themselves, and the checks of each value, are `config`'s.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tpu_reason.config import Config
from tpu_reason.errors import UserError


def _recipes_dir() -> Path:
  """The packaged recipes: `tpu_reason.recipes` in a wheel or an editable install."""
  try:
    return Path(str(importlib.resources.files("tpu_reason.recipes")))
  except ModuleNotFoundError:  # a source tree on PYTHONPATH that was never pip-installed
    return Path(__file__).resolve().parent.parent / "recipes"


RECIPES = _recipes_dir()


class Raw(str):
  """A command-line override value: parsed as YAML only for non-string fields."""


def _coerce(value: Any, typ: Any, where: str, default: Any = None) -> Any:
  """Convert a YAML / command-line value to the field's declared type (a section: over its `default`)."""
  if isinstance(value, Raw):
    if typ is str or typ == (str | None):
      return str(value)
    value = _parse_value(value)
  origin = typing.get_origin(typ)
  if dataclasses.is_dataclass(typ):
    if not isinstance(value, dict):
      raise UserError(f"{where} must be a mapping, got {value!r}")
    return build(typ, value, where + ".", default)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
      return None
    return _coerce(value, args[0], where)
  if origin is tuple:
    (item, *_) = typing.get_args(typ)
    if isinstance(value, str):
      value = [v for v in value.strip("()[] ").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
      raise UserError(f"{where} must be a list, got {value!r}")
    return tuple(_coerce(v, item, where) for v in value)
  if typ is bool:
    if isinstance(value, bool):
      return value
    if str(value).lower() in ("true", "1", "yes", "on"):
      return True
    if str(value).lower() in ("false", "0", "no", "off"):
      return False
    raise UserError(f"{where} must be true or false, got {value!r}")
  if typ in (int, float):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
      raise UserError(f"{where} must be {typ.__name__}, got {value!r}")
    try:
      out = typ(value)
    except (TypeError, ValueError, OverflowError):
      raise UserError(f"{where} must be {typ.__name__}, got {value!r}") from None
    if typ is float and not math.isfinite(out):  # no setting means anything at nan or inf
      raise UserError(f"{where} must be a finite number, got {value!r}")
    if typ is int and isinstance(value, float) and value != out:
      raise UserError(f"{where} must be an integer, got {value!r}")
    return out
  if typ is str:
    if value is None:
      return ""
    if isinstance(value, bool):  # YAML's true / false, for fields that read them (model.remat)
      return str(value).lower()
    if not isinstance(value, (str, int, float)):
      raise UserError(f"{where} must be a string, got {value!r}")
    return str(value)
  return value


def build(cls, values: dict, prefix: str = "", base=None):
  """Dataclass `cls` from a nested dict over `base` (a section's default in its parent, e.g. GRPO's
  sampling; else `cls()`), rejecting unknown keys. A shared section's messages name it where it sits."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise UserError(f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}")
  base = cls() if base is None else base
  kwargs = {k: _coerce(v, hints[k], prefix + k, getattr(base, k)) for k, v in values.items()}
  try:
    return dataclasses.replace(base, **kwargs)
  except UserError as e:
    section = getattr(cls, "section", None)
    raise UserError(str(e).replace(f"{section}.", prefix) if section and prefix else str(e)) from None


# Keys that moved into shared sections (old -> new): recipes, overrides and the config.yaml of runs
# made before the move still load, with a note.
MOVED = {
    **{f"train.{k}": f"train.optim.{k}" for k in ("lr", "warmup_steps", "schedule", "weight_decay", "clip_norm")},
    **{f"grpo.{k}": f"grpo.optim.{k}" for k in ("lr", "warmup_steps")},
    **{f"grpo.{k}": f"grpo.sampling.{k}" for k in ("max_new_tokens", "temperature", "top_k", "top_p")},
    **{f"curate.{k}": f"curate.sampling.{k}" for k in ("max_new_tokens", "temperature", "top_k")},
    "train.vocab_chunk": "model.vocab_chunk",
    "train.peak_flops": "mesh.peak_flops",
}


def _migrate(tree: dict, where: str) -> dict:
  """A recipe's `tree` with every key of MOVED at its new place (one note per key moved); both places set is
  an error (which would win is a guess)."""
  for old, new in MOVED.items():
    section, leaf = old.split(".")
    node = tree.get(section)
    if isinstance(node, dict) and leaf in node:
      if _get(tree, new) is not _MISSING:
        raise UserError(f"{where}: sets both {old} (an old name) and {new}: keep only {new}")
      print(f"note: {where}: {old} is now {new}", file=sys.stderr)
      _set(tree, new, node.pop(leaf))
  return tree


_MISSING = object()


def _get(tree: dict, dotted: str):
  node = tree
  for p in dotted.split("."):
    if not isinstance(node, dict) or p not in node:
      return _MISSING
    node = node[p]
  return node


def from_saved(tree: dict, where: str):
  """The Config a run saved (its config.yaml or a checkpoint's meta), keys moved since read at their new place."""
  if not isinstance(tree, dict):
    raise UserError(f"{where}: the saved config is not a mapping")
  return build(Config, _migrate(json.loads(json.dumps(tree)), where))


def _set(tree: dict, dotted: str, value: Any):
  *path, leaf = dotted.split(".")
  node = tree
  for p in path:
    node = node.setdefault(p, {})
    if not isinstance(node, dict):
      raise UserError(f"override {dotted!r}: {p!r} is not a section")
  node[leaf] = value


def _parse_value(text: str) -> Any:
  """`1e-4` -> float, `[1,2]` -> list, `abc` -> str (YAML scalar rules)."""
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError:
    return text


def recipe_names() -> list[str]:
  """The packaged recipes, as `--config NAME` takes them."""
  return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(config: str | Path) -> Path:
  """A YAML file as given, else the packaged recipe of that name (`smollm2-135m-cpu`, `recipes/X.yaml`)."""
  path = Path(config)
  if path.is_file():
    return path
  packaged = RECIPES / (path.name if path.name.endswith(".yaml") else f"{path.name}.yaml")
  if packaged.is_file():
    return packaged
  raise UserError(f"recipe not found: {config} (a YAML file, or one of the packaged recipes: {', '.join(recipe_names())})")


def recipe_list() -> str:
  """One line per packaged recipe: its name and the comment it opens with."""
  names = recipe_names()
  width = max(map(len, names), default=0)
  heads = ((RECIPES / f"{n}.yaml").read_text().split("\n", 1)[0] for n in names)
  return "\n".join(f"{n:<{width}}  {h.removeprefix('#').strip()}" for n, h in zip(names, heads))


class _StrictLoader(yaml.SafeLoader):
  """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

  def construct_mapping(self, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
      key = self.construct_object(key_node, deep=deep)
      if key in seen:
        raise UserError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in the same section")
      seen.add(key)
    return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
  """A YAML file's content; errors name the file and line."""
  try:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
  except UnicodeDecodeError:
    raise UserError(f"{path}: not a text file (invalid UTF-8): a recipe is YAML text") from None
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror})") from None
  except UserError as e:
    raise UserError(f"{path}: {e}") from None
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    raise UserError(f"{path}: invalid YAML{line}: {problem}") from None


def _check_keys(cls, tree: dict, where: str, prefix: str = ""):
  """Every key of a recipe file names a field (the message names the file, not an override)."""
  fields = {f.name: f.type for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  for key, value in tree.items():
    if key not in fields:
      raise UserError(f"{where}: unknown config key '{prefix}{key}'; valid keys here: {', '.join(sorted(fields))}")
    if dataclasses.is_dataclass(hints[key]):
      if not isinstance(value, dict):
        raise UserError(f"{where}: {prefix}{key} must be a section (a mapping of keys), got {value!r}")
      _check_keys(hints[key], value, where, f"{prefix}{key}.")


def load(cls, config: str | Path | None = None, overrides: list[str] = ()):
  """Defaults <- recipe YAML <- `a.b=value` overrides, validated."""
  tree: dict = {}
  if config:
    path = recipe_path(config)
    tree = read_yaml(path) or {}
    if not isinstance(tree, dict):
      raise UserError(f"{path}: a recipe must be a mapping of sections")
    tree = _migrate(tree, str(path)) if cls is Config else tree
    _check_keys(cls, tree, str(path))
  for item in overrides:
    if "=" not in item:
      raise UserError(f"override {item!r} must look like key.sub=value")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-")
    if cls is Config and key in MOVED:
      print(f"note: {key} is now {MOVED[key]}", file=sys.stderr)
      key = MOVED[key]
    _set(tree, key, Raw(value))
  return build(cls, tree)


def parse_args(cls, argv: list[str], extra: dict[str, str] | None = None):
  """Parse `--config X`, `key.sub=value` overrides and the CLI's own `extra` flags.

  `extra` maps a flag to a dotted config key (a shorthand override, e.g. --model ->
  model.spec) or to a plain name returned in the flags dict; a name ending in "?" is a
  switch that takes no value (`--raw` -> flags["raw"] = "true").
  """
  extra = extra or {}
  config, overrides, flags = None, [], {}
  args = list(argv)
  while args:
    arg = args.pop(0)
    name = arg.split("=", 1)[0]
    if name == "--config" or name in extra:
      switch = extra.get(name, "").endswith("?")
      if "=" in arg:
        value = arg.split("=", 1)[1]
      elif switch:
        value = "true"
      elif args and not args[0].startswith("--"):
        value = args.pop(0)
      else:
        raise UserError(f"{name} needs a value")
      if name == "--config":
        if config is not None:
          raise UserError(f"--config given twice ({config} and {value}): give one recipe, and key.sub=value "
                          "overrides for the rest")
        config = value
      elif "." in extra[name]:
        overrides.append(f"{extra[name]}={value}")
      else:
        flags[extra[name].rstrip("?")] = value
    elif arg in ("-h", "--help"):
      raise SystemExit(_usage(cls, extra))
    elif arg == "--list-recipes":
      print(recipe_list())
      raise SystemExit(0)
    elif arg.startswith("--") and "=" not in arg:
      raise UserError(f"unknown flag {arg}; use --config FILE and key.sub=value overrides")
    else:
      overrides.append(arg.removeprefix("--"))
  return load(cls, config, overrides), flags


def _usage(cls, extra: dict[str, str]) -> str:
  flags = "".join(f" [{f} ...]" for f in extra)
  lines = [f"usage:{flags} [--config NAME|FILE.yaml] [key.sub=value ...] | --list-recipes", "",
           f"packaged recipes (--config NAME): {', '.join(recipe_names())}", "", "keys (default):"]
  lines += [f"  {k} = {v!r}" for k, v in flatten(to_dict(cls())).items()]
  return "\n".join(lines)


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def dump(cfg) -> str:
  """Resolved config as YAML text (what gets printed and saved with a run)."""
  return yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False)


def save(cfg, out_dir: Path) -> Path:
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / "config.yaml"
  path.write_text(dump(cfg))
  return path
