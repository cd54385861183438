"""Nested parameter pytrees and their flat '/'-joined names ('layers/q'), both ways."""

from __future__ import annotations

from typing import Any


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{'layers/q': x} -> {'layers': {'q': x}}."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    *path, leaf = name.split("/")
    node = out
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Inverse of `unflatten`."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, name + "/"))
    else:
      out[name] = v
  return out
