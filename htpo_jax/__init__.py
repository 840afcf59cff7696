"""htpo_jax: HTPO (arXiv 2605.08283) in JAX/Flax, TPU-first."""

__version__ = "0.1.0"
