"""The jitted update: micro-batch accumulation equals one batch (sharded on 4 devices:
multidevice/test_sharded_train.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_update_batch
from tiny_models import tiny_model

from htpo_jax.rl.train_step import StepConfig, TrainState, jit_update, make_optimizer
from htpo_jax.run.config import load_config


@pytest.mark.slow  # ~50-65 s per loss on a loaded 2-core box; test_loss checks the loss's part
@pytest.mark.parametrize("loss", ["htpo", "dapo", "grpo"])
def test_micro_batch_accumulation_equals_one_batch(loss):
    # A large Adam eps: the first Adam step is ~sign(g), which amplifies float noise in tiny g.
    cfg = load_config(
        None,
        [
            f"algorithm.loss={loss}",
            "optim.learning_rate=1e-2",
            "optim.eps=1e-3",
            "optim.warmup_steps=0",
        ],
    )
    sc = StepConfig.from_config(cfg)
    model = tiny_model()
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg.optim, 10)
    batch = random_update_batch()
    results = []
    for micro in (8, 2):
        state = TrainState.create(jax.tree.map(jnp.copy, params), tx)
        mini = jax.tree.map(lambda x, m=micro: jnp.asarray(x).reshape(-1, m, *x.shape[1:]), batch)
        new, metrics = jit_update(graphdef, tx, sc)(state, mini)
        results.append((new.params, metrics))
    (p1, m1), (p2, m2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # Adam step ~ lr = 1e-2


def test_kl_estimators_and_an_unknown_kind_is_refused():
    """verl's estimators on log pi - log ref; an unknown kind is an error (was low_var_kl)."""
    from htpo_jax.rl.train_step import kl_penalty

    lp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
    d = lp - ref
    np.testing.assert_allclose(kl_penalty(lp, ref, "kl"), d)
    np.testing.assert_allclose(kl_penalty(lp, ref, "abs"), jnp.abs(d))
    np.testing.assert_allclose(kl_penalty(lp, ref, "mse"), 0.5 * d**2)
    np.testing.assert_allclose(kl_penalty(lp, ref, "low_var_kl"), jnp.exp(-d) + d - 1, rtol=1e-6)
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_penalty(lp, ref, "k9")
