"""lmjax: decoder-only language models in JAX/Flax, from a laptop CPU to a TPU pod slice."""

__version__ = "0.1.0"
