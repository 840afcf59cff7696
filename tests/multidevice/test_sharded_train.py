"""The loss and the jitted update, sharded over fake CPU devices, equal the unsharded ones:
htpo_loss with its batch split 8 ways, jit_update on a data=2 x fsdp=2 mesh of 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_loss_batch, random_update_batch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_models import tiny_model

from htpo_jax.infra.sharding import logical_sharding, make_mesh, shard_model
from htpo_jax.rl.loss import htpo_loss
from htpo_jax.rl.train_step import StepConfig, TrainState, jit_update, make_optimizer
from htpo_jax.run.config import load_config


def test_sharded_loss_batch_matches_unsharded():
    assert jax.device_count() == 8
    args = [jnp.asarray(x) for x in random_loss_batch(16, 96, 4)]
    f = jax.jit(jax.value_and_grad(lambda lp, *a: htpo_loss(lp, *a)[0]))
    want = f(*args)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sh = [jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1))))) for x in args]
    got = f(*sh)
    assert len(got[1].sharding.device_set) == 8
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # ~65 s on a loaded 2-core box
def test_update_sharded_on_four_devices_matches_one():
    assert jax.device_count() == 8  # the mesh takes the first 4
    cfg = load_config(None, ["optim.learning_rate=1e-2", "optim.warmup_steps=0"])
    sc, tx = StepConfig.from_config(cfg), make_optimizer(cfg.optim, 10)
    batch = random_update_batch()

    def run(mesh):
        model = tiny_model()
        with jax.set_mesh(mesh):
            if mesh.size > 1:
                shard_model(model, mesh)
            graphdef, params = nnx.split(model)
            state = TrainState.create(params, tx)

            def put(x):
                spec = (None, "act_batch") + (None,) * (x.ndim - 1)
                sharding = logical_sharding(spec, mesh, (2, 4) + x.shape[1:])
                return jax.device_put(x.reshape(2, 4, *x.shape[1:]), sharding)

            new, m = jit_update(graphdef, tx, sc)(state, jax.tree.map(put, batch))
            return new, m

    one = run(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    four = run(make_mesh(2, 2, 1, devices=jax.devices()[:4]))
    np.testing.assert_allclose(one[1]["loss"], four[1]["loss"], rtol=1e-5)
    leaves = jax.tree.leaves(four[0].params)
    assert any(
        len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated for x in leaves
    )
    for a, b in zip(jax.tree.leaves(one[0].params), leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
