"""Glue to other JAX training frameworks (the top layer: may import rl and models; nothing in
htpo_jax imports it). Each module needs its own extra, e.g. `pip install -e ".[tunix]"`."""
