"""Checkpoints: round trip of params + optax state + typed RNG key + JSON, retention, crashes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_state

from htpo_jax.run.checkpoint import Checkpointer
from htpo_jax.run.config import load_config
from htpo_jax.run.data import DataState


def assert_same(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jnp.issubdtype(y.dtype, jax.dtypes.prng_key)
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip(tmp_path):
    state = make_state(seed=5)
    cfg = load_config()
    extra = {"data": DataState(2, 17).to_json(), "config": cfg.to_dict()}
    with Checkpointer(tmp_path / "ck", max_to_keep=2, save_every=1) as ck:
        assert ck.restore_latest(make_state()) is None
        ck.save(5, state, extra)
    # a new process-like instance finds it; the template has other values, same structure
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.latest_step() == 5
        restored, got = ck.restore_latest(make_state(seed=0))
    assert_same(state, restored)
    assert got["step"] == 5 and DataState.from_json(got["data"]) == DataState(2, 17)
    assert got["config"] == cfg.to_dict()
    # the restored key draws the same numbers
    np.testing.assert_array_equal(
        jax.random.uniform(state["rng"], (3,)), jax.random.uniform(restored["rng"], (3,))
    )


def test_other_key_impl(tmp_path):
    state = {"rng": jax.random.key(3, impl="rbg"), "x": jnp.ones(2)}
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state)
        restored, _ = ck.restore_latest({"rng": jax.random.key(0, impl="rbg"), "x": jnp.zeros(2)})
    assert_same(state, restored)


def test_keep_last_and_schedule(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, save_every=10) as ck:
        assert [s for s in range(1, 26) if ck.should_save(s)] == [10, 20]
        assert ck.should_save(25, last=True)
        for step in (10, 20, 25):
            ck.save(step, make_state(step))
        ck.wait()
        assert ck.all_steps() == [20, 25]
        restored, extra = ck.restore_latest(make_state())
        assert extra["step"] == 25
        assert_same(make_state(25), restored)
        old, _ = ck.restore(20, make_state())
        assert_same(make_state(20), old)
    assert not Checkpointer(tmp_path, save_every=0).should_save(10)


def test_half_written_checkpoint_is_ignored(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(3, make_state(3))
    # what a crash during the save of step 4 leaves: Orbax's temporary directory
    tmp = tmp_path / "4.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_text("half")
    with Checkpointer(tmp_path) as ck:
        assert ck.latest_step() == 3
        _, extra = ck.restore_latest(make_state())
        assert extra["step"] == 3


def test_structure_mismatch_fails_loudly(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"a": jnp.ones(3)})
        with pytest.raises(Exception):  # noqa: B017 - orbax's error type varies by version
            ck.restore_latest({"a": jnp.ones(3), "b": jnp.ones(2)})


def test_from_config(tmp_path):
    cfg = load_config(overrides=[f"trainer.output_dir={tmp_path}", "checkpoint.save_every=4"])
    with Checkpointer.from_config(cfg) as ck:
        assert ck.directory == (tmp_path / "checkpoints").absolute()
        assert ck.should_save(8) and not ck.should_save(6)
