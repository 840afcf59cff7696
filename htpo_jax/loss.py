"""`from htpo_jax.loss import htpo_loss, LossConfig, ...`: every public name of
`htpo_jax/rl/loss.py` under its documented import path, for use in other JAX trainers."""

from htpo_jax.rl.loss import *  # noqa: F403
