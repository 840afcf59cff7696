"""The recipe deviations of issue 10, fixed: warmup counted in RL steps, non-finite updates
skipped and counted, reward routing by data_source, balance_batch, per-source validation."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_update_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from htpo_jax.infra.sharding import make_mesh
from htpo_jax.rewards.routing import (
    UnknownDataSource,
    check_sources,
    reward_for_source,
    routed_rewards,
)
from htpo_jax.rewards.scoring import compute_rewards
from htpo_jax.rl import balance
from htpo_jax.rl import validation as eval_lib
from htpo_jax.rl.train_step import (
    StepConfig,
    TrainState,
    jit_apply_grads,
    jit_micro_grads,
    jit_update,
    make_optimizer,
    rl_step_schedule,
)
from htpo_jax.run.config import load_config
from htpo_jax.run.stages import MicroSpec, update_all


def _state(params, tx):
    return TrainState.create(jax.tree.map(jnp.copy, params), tx)


def _mini(batch, micro=4):  # [N, ...] -> [N / micro, micro, ...]
    return jax.tree.map(lambda x: jnp.asarray(x).reshape(-1, micro, *x.shape[1:]), batch)


# ---------------------------------------------------------------- warmup in RL steps
@pytest.mark.slow
def test_every_update_of_rl_step_s_uses_the_step_s_lr():
    cfg = load_config(None, ["optim.learning_rate=1e-3", "optim.warmup_steps=3"])
    updates_per_step, steps = 4, 5
    tx = make_optimizer(cfg.optim, steps, updates_per_step)
    sched = rl_step_schedule(cfg.optim, steps)
    graphdef, params = nnx.split(tiny_model())
    state, update = _state(params, tx), jit_update(graphdef, tx, StepConfig.from_config(cfg))
    mini = _mini(random_update_batch())
    lrs = []
    for _ in range(steps * updates_per_step):
        state, metrics = update(state, mini)
        lrs.append(float(metrics["lr"]))
    lrs = np.array(lrs).reshape(steps, updates_per_step)  # [RL step, update]
    want = np.array([float(sched(s)) for s in range(steps)])  # RL step s + 1 <-> index s
    np.testing.assert_allclose(lrs, np.repeat(want[:, None], updates_per_step, 1), rtol=1e-6)
    # verl's constant-with-warmup values: 0, 1/3, 2/3, then the peak.
    np.testing.assert_allclose(want, 1e-3 * np.array([0, 1 / 3, 2 / 3, 1, 1]), rtol=1e-6)


# ---------------------------------------------------------------- non-finite updates
@pytest.mark.slow
def test_nan_gradient_skips_the_update_and_counts_it():
    cfg = load_config(None, ["optim.learning_rate=1e-2", "optim.warmup_steps=0"])
    tx = make_optimizer(cfg.optim, 10)
    graphdef, params = nnx.split(tiny_model())
    update = jit_update(graphdef, tx, StepConfig.from_config(cfg))
    good = random_update_batch()
    state, metrics = update(_state(params, tx), _mini(good))  # one real update first
    assert float(metrics["nonfinite_skipped"]) == 0
    before = jax.tree.map(np.asarray, (state.params, state.opt_state.inner_state))
    bad = good.replace(old_log_prob=np.where(good.response_mask > 0, np.nan, 0.0))
    new, metrics = update(state, _mini(bad))
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["nonfinite_skipped"]) == 1
    after = jax.tree.map(np.asarray, (new.params, new.opt_state.inner_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)  # parameters and AdamW state untouched
    assert int(new.step) == 2 and int(new.opt_state.count) == 2  # the schedule moved on
    new, metrics = update(new, _mini(good))  # and training goes on
    assert float(metrics["nonfinite_skipped"]) == 0


@pytest.mark.slow
def test_rl_step_reports_the_number_of_skipped_updates():
    cfg = load_config(
        None,
        [
            "rollout.n=2",
            "data.train_batch_size=4",
            "optim.mini_batch_size=2",
            "optim.micro_batch_size=4",
            "optim.warmup_steps=0",
        ],
    )
    tx = make_optimizer(cfg.optim, 10, 2)
    graphdef, params = nnx.split(tiny_model())
    batch = random_update_batch()  # 8 rows = 2 mini-batches of 2 prompts x 2 samples
    nan_second = np.where(np.arange(8)[:, None] >= 4, np.nan, batch.old_log_prob)
    batch = batch.replace(old_log_prob=nan_second.astype(np.float32))
    mesh = make_mesh(1, -1, 1)
    sc = StepConfig.from_config(cfg)
    fns = (jit_micro_grads(graphdef, sc), jit_apply_grads(tx, sc=sc))
    p = types.SimpleNamespace(mesh=mesh, step_cfg=sc, update_fns=fns)
    spec = MicroSpec.of(cfg, mesh)
    with jax.set_mesh(mesh):
        state, metrics = update_all(p, _state(params, tx), batch, spec, cfg.optim, cfg.rollout.n)
    assert metrics["train/nonfinite_skipped"] == 1
    assert int(state.step) == 2


# ---------------------------------------------------------------- reward routing
def test_reward_table_follows_verl():
    for source in ("math_dapo", "aime24", "aime-2025", "math", "arith"):
        assert reward_for_source(source) == "dapo_math", source
    assert reward_for_source("HuggingFaceH4/MATH-500") == "math_verify"
    assert reward_for_source("openai/gsm8k") is None


def test_unknown_source_is_one_clear_error_unless_forced():
    cfg = load_config(None, [])
    with pytest.raises(UnknownDataSource, match=r"f.jsonl: no reward for data_source 'mystery'"):
        check_sources(["aime24", "mystery"], cfg, "f.jsonl")
    forced = load_config(None, ["algorithm.reward_routing=reward_fn"])
    check_sources(["mystery"], forced)  # every row takes algorithm.reward_fn
    reward, scored = routed_rewards(["Answer: 3"], ["3"], ["mystery"], [5], forced)
    assert scored.acc.tolist() == [True]


def test_rows_are_scored_by_their_sources_reward_in_input_order():
    cfg = load_config(None, ["algorithm.reward_timeout_s=0"])
    sols = ["Answer: 12", "The answer is $\\boxed{12}$", "Answer: 7", "$\\boxed{7}$"]
    truths = ["12", "12", "8", "7"]
    sources = ["aime24", "HuggingFaceH4/MATH-500", "math_dapo", "HuggingFaceH4/MATH-500"]
    lengths = np.array([5, 9, 5, 6])
    reward, scored = routed_rewards(sols, truths, sources, lengths, cfg)
    for fn, rows in (("dapo_math", [0, 2]), ("math_verify", [1, 3])):
        sub = load_config(None, ["algorithm.reward_timeout_s=0", f"algorithm.reward_fn={fn}"])
        r, s = compute_rewards(
            [sols[i] for i in rows], [truths[i] for i in rows], lengths[rows], sub
        )
        np.testing.assert_array_equal(reward[rows], r)
        assert [scored.pred[i] for i in rows] == s.pred
        np.testing.assert_array_equal(scored.acc[rows], s.acc)


# ---------------------------------------------------------------- balance_batch
@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 500), min_size=1, max_size=12),
    dp=st.sampled_from([1, 2, 4]),
)
def test_balanced_partitions_are_equal_size_and_balanced(lengths, dp):
    seqlen = np.array(lengths * dp * 2)  # a multiple of dp rows
    parts = balance.balanced_partitions(seqlen, dp)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(seqlen)))
    assert {len(p) for p in parts} == {len(seqlen) // dp}
    sums = [seqlen[p].sum() for p in parts]
    assert max(sums) - min(sums) <= seqlen.max()  # greedy bound: at most one row apart


def test_one_shard_keeps_the_order_and_shards_get_their_partition():
    rng = np.random.default_rng(0)
    seqlen = rng.integers(10, 500, 64)
    np.testing.assert_array_equal(balance.mesh_order(seqlen, 1, 32, 8), np.arange(64))
    order = balance.mesh_order(seqlen, 4, 32, 8)  # 2 mini-batches x 4 micro x 4 shards x 2 rows
    parts = balance.balanced_partitions(seqlen, 4)
    # [mini, micro, shard, rows] -> shard r's rows, in layout order, are partition r in order
    by_shard = order.reshape(2, 4, 4, 2).transpose(2, 0, 1, 3).reshape(4, -1)
    for r in range(4):
        np.testing.assert_array_equal(by_shard[r], parts[r])
    stats = balance.balance_stats(seqlen, order, 4, 8)
    assert stats["global_seqlen/balanced_max"] - stats["global_seqlen/balanced_min"] <= 500
    assert stats["global_seqlen/balanced_max"] <= stats["global_seqlen/max"]


# ---------------------------------------------------------------- per-source validation
def test_validation_reports_each_data_source(monkeypatch):
    cfg = load_config(None, ["rollout.val_n=2", "data.val_batch_size=3"])
    acc = {"p0": [1, 1], "p1": [0, 0], "p2": [1, 0], "p3": [0, 1]}
    rows = [("p0", "aime24"), ("p1", "aime24"), ("p2", "math_dapo"), ("p3", "math_dapo")]

    class DS:
        def iter_batches(self, size):
            for i in range(0, len(rows), size):
                part = rows[i : i + size]
                yield types.SimpleNamespace(
                    ids=[p for p, _ in part], data_source=tuple(s for _, s in part)
                )

    def fake_sample(sampler, params, tok, batch, cfg, **kw):
        a = np.array([acc[p] for p in batch.ids], bool).reshape(-1)
        return types.SimpleNamespace(acc=a, lengths=np.full(a.shape, 5))

    monkeypatch.setattr(eval_lib, "sample_and_score", fake_sample)
    out = eval_lib.validate(None, None, None, DS(), cfg, rng=jax.random.key(0))
    assert out["val/accuracy"] == pytest.approx(0.5)
    assert out["val/aime24/mean@2"] == pytest.approx(0.5)
    assert out["val/aime24/pass@2"] == pytest.approx(0.5)
    assert out["val/math_dapo/mean@2"] == pytest.approx(0.5)
    assert out["val/math_dapo/pass@2"] == pytest.approx(1.0)


def test_balance_batch_moves_whole_rows_together():
    cfg = load_config(
        None,
        [
            "rollout.n=2",
            "data.train_batch_size=4",
            "optim.mini_batch_size=2",
            "optim.micro_batch_size=4",
        ],
    )
    batch = random_update_batch()
    new, stats = balance.balance_batch(batch, 2, cfg)
    order = balance.mesh_order(batch.attention_mask.sum(-1), 2, 4, 4)
    for field in ("input_ids", "attention_mask", "advantages", "old_log_prob", "hard", "correct"):
        np.testing.assert_array_equal(np.asarray(getattr(new, field)), getattr(batch, field)[order])
    assert new.prompt_len == batch.prompt_len
    assert (
        stats["global_seqlen/balanced_max"] - stats["global_seqlen/balanced_min"]
        <= (stats["global_seqlen/minmax_diff"])
    )
    same, _ = balance.balance_batch(batch, 1, cfg)  # one shard: nothing moves, as in verl
    np.testing.assert_array_equal(np.asarray(same.input_ids), batch.input_ids)


def test_every_routed_verifier_gets_a_pool_owned_and_closed_by_the_caller():
    """With workers, each verifier the rows route to is scored by its own pool from the
    caller's `RewardPools` (the run owns one); closing it stops every worker; the scores equal
    the inline ones."""
    from htpo_jax.rewards import RewardPools

    sols = ["Answer: 12", "The answer is $\\boxed{12}$", "Answer: 7", "$\\boxed{7}$"]
    truths = ["12", "12", "8", "7"]
    sources = ["aime24", "HuggingFaceH4/MATH-500", "math_dapo", "HuggingFaceH4/MATH-500"]
    lengths = np.array([5, 9, 5, 6])
    inline = routed_rewards(sols, truths, sources, lengths, load_config(None, []))
    cfg = load_config(None, ["algorithm.reward_num_workers=1"])
    with RewardPools() as pools:
        reward, scored = routed_rewards(sols, truths, sources, lengths, cfg, pools=pools)
        started = dict(pools._pools)
        assert {k[0] for k in started} == {"dapo_math", "math_verify"}
        procs = [e[0] for p in started.values() for e in p._workers if e is not None]
        assert procs and all(p.is_alive() for p in procs)
    assert not pools._pools and not any(p.is_alive() for p in procs)
    np.testing.assert_array_equal(reward, inline[0])
    np.testing.assert_array_equal(scored.acc, inline[1].acc)
