"""The jitted update: micro-batch accumulation equals one batch; it runs sharded on 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import run_on_fake_devices, small_qwen3

from htpo_jax.rl.train_step import StepConfig, TrainState, UpdateBatch, jit_update, make_optimizer
from htpo_jax.run.config import load_config


def tiny_model():
    return small_qwen3(64, tied=False)


def random_batch(n=8, p=6, r=10, seed=0):
    rng = np.random.default_rng(seed)
    pmask = (np.arange(p)[None] >= rng.integers(0, p - 1, (n, 1))).astype(np.int32)
    rmask = (np.arange(r)[None] < rng.integers(1, r + 1, (n, 1))).astype(np.int32)
    ids = rng.integers(1, 64, (n, p + r)).astype(np.int32)
    rm = rmask.astype(np.float32)
    return UpdateBatch(
        input_ids=ids,
        attention_mask=np.concatenate([pmask, rmask], 1),
        response_mask=rm,
        old_log_prob=(-rng.gamma(2, 2, (n, r)) * rm).astype(np.float32),
        ref_log_prob=np.zeros_like(rm),
        advantages=(rng.normal(size=(n, 1)) * rm).astype(np.float32),
        hard=rng.random(n) < 0.5,
        correct=rng.random(n) < 0.5,
        prompt_len=p,
    )


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
    batch = random_batch()
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


SHARDED = """
import sys; sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from htpo_jax.run.config import load_config
from htpo_jax.infra.sharding import make_mesh, shard_model, logical_sharding
from htpo_jax.rl.train_step import StepConfig, TrainState, jit_update, make_optimizer
from test_train_step import tiny_model, random_batch
assert jax.device_count() == 4
cfg = load_config(None, ["optim.learning_rate=1e-2", "optim.warmup_steps=0"])
sc, tx = StepConfig.from_config(cfg), make_optimizer(cfg.optim, 10)
batch = random_batch()
def run(mesh):
    model = tiny_model()
    with jax.set_mesh(mesh):
        if mesh.size > 1:
            shard_model(model, mesh)
        graphdef, params = nnx.split(model)
        state = TrainState.create(params, tx)
        put = lambda x: jax.device_put(x.reshape(2, 4, *x.shape[1:]), logical_sharding(
            (None, "act_batch") + (None,) * (x.ndim - 1), mesh, (2, 4) + x.shape[1:]))
        new, m = jit_update(graphdef, tx, sc)(state, jax.tree.map(put, batch))
        return new, m
one = run(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
four = run(make_mesh(2, 2, 1))
np.testing.assert_allclose(one[1]["loss"], four[1]["loss"], rtol=1e-5)
leaves = jax.tree.leaves(four[0].params)
assert any(len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated for x in leaves)
for a, b in zip(jax.tree.leaves(one[0].params), leaves, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
print("OK")
"""


@pytest.mark.slow
def test_update_sharded_on_four_devices_matches_one():
    run_on_fake_devices(SHARDED, 4)


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
