"""tpu_reason: teach small language models to reason in explicit tags, on TPU with JAX."""

__version__ = "0.1.0"
