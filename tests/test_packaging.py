"""pyproject.toml against the tree: every package and the recipes ship, and the Python floor is jax's."""

import importlib.metadata
import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_of_the_tree_is_listed():
  listed = PROJECT["tool"]["setuptools"]["packages"]
  found = sorted(".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "tpu_reason").rglob("__init__.py"))
  assert sorted(listed) == sorted([*found, "tpu_reason.recipes"])
  assert PROJECT["tool"]["setuptools"]["package-dir"] == {"tpu_reason.recipes": "recipes"}


def test_requires_python_is_jax_s():
  # the pinned jax decides which Pythons work (Kaggle's TPU image: 3.12; scripts/check_tpu_extra.sh)
  assert PROJECT["project"]["requires-python"] == importlib.metadata.metadata("jax")["Requires-Python"] == ">=3.11"
