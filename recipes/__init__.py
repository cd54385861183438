"""The recipes, installed as the package `tpu_reason.recipes` (pyproject.toml maps this folder in).

A regular package, not a namespace: setuptools' editable installs only map packages with an
__init__.py, and `tpu_reason.config` finds the YAML files through importlib.resources.
"""
