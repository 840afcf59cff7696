"""Token-budget micro-batches: the plan covers every row once within budget, and the packed
scoring pass and update equal the padded ones (the loss stays the global token-mean), for every
loss and aggregation mode (the Dr. GRPO divisor is a constant, not the micro-batch's width)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import overrides, random_update_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from htpo_jax.rl import packing
from htpo_jax.rl.loss import AGG_MODES, LOSSES, LossConfig, LossInputs
from htpo_jax.rl.train_step import (
    StepConfig,
    TrainState,
    jit_apply_grads,
    jit_micro_grads,
    jit_update,
    make_optimizer,
    packed_update,
    score_responses,
)
from htpo_jax.run.config import load_config
from htpo_jax.run.metrics import read_metrics
from htpo_jax.run.train import main


def test_length_bucket_values():
    got = [packing.length_bucket(n, 64) for n in (1, 64, 65, 96, 97, 128, 129, 193, 700)]
    assert got == [64, 64, 96, 96, 128, 128, 192, 256, 768]
    assert packing.length_bucket(20000, 64, cap=20480) == 20480
    assert packing.widths(1024, 64) == [64, 96, 128, 192, 256, 384, 512, 768, 1024]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=40),
    prompt=st.integers(1, 64),
    budget=st.integers(50, 2000),
    shards=st.sampled_from([1, 2, 4]),
)
def test_plan_covers_rows_once_within_budget(lengths, prompt, budget, shards):
    ext = np.array(lengths)
    micros = packing.plan(ext, prompt, max_tokens=budget, shards=shards, multiple=16, cap=304)
    rows = np.concatenate([m.rows for m in micros])
    assert sorted(rows[rows >= 0].tolist()) == list(range(len(ext)))
    for m in micros:
        real = m.rows[m.rows >= 0]
        assert len(real) and m.rows[0] >= 0  # fillers only at the end
        assert (ext[real] <= m.width).all()
        assert len(m.rows) % shards == 0
        per_shard = len(m.rows) // shards
        # within budget per shard, unless one row alone is longer than the budget
        assert per_shard * (prompt + m.width) <= budget or per_shard == 1
    # bounded shapes: one row count per width
    assert len({(len(m.rows), m.width) for m in micros}) == len({m.width for m in micros})


def test_padding_fraction_drops_on_skewed_lengths():
    rng = np.random.default_rng(0)
    ext = np.minimum(rng.lognormal(6.0, 1.0, 256).astype(int) + 1, 4096)
    mask = (np.arange(4096)[None] < ext[:, None]).astype(np.int32)
    before = packing.padding_fraction(mask, 256 * 4096)
    micros = packing.plan(ext, 0, max_tokens=8192, multiple=64, cap=4096)
    after = packing.padding_fraction(mask, packing.computed_tokens(micros, 0))
    assert after < 0.35 < before


MAX_RESPONSE = 64  # rollout.max_response_length of these tests: wider than any batch below


def _setup(loss, agg="token-mean"):
    cfg = load_config(
        None,
        [
            f"algorithm.loss={loss}",
            f"algorithm.loss_agg_mode={agg}",
            "optim.learning_rate=1e-2",
            "optim.eps=1e-3",
            "optim.warmup_steps=0",
            f"rollout.max_response_length={MAX_RESPONSE}",
            "algorithm.overlong_buffer_len=16",
        ],
    )
    sc = StepConfig.from_config(cfg)
    graphdef, params = nnx.split(tiny_model())
    tx = make_optimizer(cfg.optim, 10)
    return sc, graphdef, params, tx


def _state(params, tx):
    p = jax.tree.map(jnp.copy, params)
    return TrainState.create(p, tx)


@pytest.mark.parametrize(
    "loss,agg",
    [
        # each aggregation mode once (test_packed_loss_equals_padded: every loss x every mode)
        pytest.param("htpo", "token-mean", marks=pytest.mark.slow),
        pytest.param("dapo", "seq-mean-token-sum", marks=pytest.mark.slow),
        pytest.param("grpo", "seq-mean-token-mean", marks=pytest.mark.slow),
        pytest.param("dr_grpo", "seq-mean-token-sum-norm", marks=pytest.mark.slow),
    ],
)
def test_packed_update_equals_unpacked(loss, agg):
    sc, graphdef, params, tx = _setup(loss, agg)
    assert sc.loss_config.max_response_length == MAX_RESPONSE
    batch = random_update_batch(n=8, p=6, r=40, seed=3)
    # one-batch update, every row padded to the full width
    mini = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)
    ref, m_ref = jit_update(graphdef, tx, sc)(_state(params, tx), mini)
    # packed: small budget -> several micro-batches of different widths, with filler rows
    micros = packing.plan(
        packing.response_extent(batch.response_mask), 6, max_tokens=60, multiple=8, cap=40
    )
    assert len({m.width for m in micros}) > 1 and any((m.rows < 0).any() for m in micros)
    dev = [jax.tree.map(jnp.asarray, packing.gather(batch, m)) for m in micros]
    rmask = np.asarray(batch.response_mask)
    new, m_new = packed_update(
        _state(params, tx),
        dev,
        jnp.float32(rmask.sum()),
        jnp.float32((rmask > 0).any(-1).sum()),
        jit_micro_grads(graphdef, sc),
        jit_apply_grads(tx),
        lambda: jax.tree.map(jnp.zeros_like, params),
    )
    np.testing.assert_allclose(m_new["loss"], m_ref["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m_new["grad_norm"], m_ref["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(m_new["lr"], m_ref["lr"])
    assert float(m_new["nonfinite_skipped"]) == float(m_ref["nonfinite_skipped"]) == 0.0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_step_config_takes_the_dr_grpo_divisor_from_the_rollout():
    sc = StepConfig.from_config(load_config(None, ["algorithm.loss=dr_grpo"]))
    assert sc.loss_config.max_response_length == load_config(None).rollout.max_response_length


def _cut(x, micro: packing.Micro):
    """A per-token array [N, R] laid out as `packing.gather` lays out the micro-batch's responses:
    its rows (fillers copy the first), cut or zero-padded to `micro.width` columns."""
    rows = np.where(micro.rows >= 0, micro.rows, micro.rows[0])
    x = np.asarray(x)[rows][:, : micro.width]
    return np.pad(x, ((0, 0), (0, micro.width - x.shape[1])))


@functools.partial(jax.jit, static_argnames=("name", "config"))
def _loss_and_grad(x: LossInputs, num_tokens, num_seqs, *, name, config):
    """LOSSES[name]'s value and gradient w.r.t. log_prob."""
    f = lambda p: LOSSES[name](
        dataclasses.replace(x, log_prob=p),
        config=config,
        num_tokens=num_tokens,
        num_sequences=num_seqs,
    )[0]
    return jax.value_and_grad(f)(x.log_prob)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_packed_loss_equals_padded(name, agg):
    """Every loss and aggregation mode, as the trainer calls it (the mini-batch's counts passed
    to every micro-batch): the micro-batches of a token-budget plan (bucket widths, filler rows)
    add up to the loss and gradient of the same rows padded to the batch's width and to a wider
    one, of one padded batch, and of equal micro-batches (the scan's accumulation). The last two
    group rows otherwise, which high_entropy_only's per-call selection depends on: not for it."""
    cfg = LossConfig(loss_agg_mode=agg, max_response_length=MAX_RESPONSE)
    batch = random_update_batch(n=8, p=6, r=40, seed=3)
    rm = np.asarray(batch.response_mask)
    rng = np.random.default_rng(1)
    lp = (np.asarray(batch.old_log_prob) + rng.normal(0, 0.3, rm.shape) * rm).astype(np.float32)
    ent = rng.gamma(1.0, 1.0, rm.shape).astype(np.float32)
    num_tokens, num_seqs = np.float32(rm.sum()), np.float32((rm > 0).any(-1).sum())
    # jit pays for its compiles only where a loss has loops (the entropy selections); eager
    # otherwise: a few seconds per test either way on a loaded 2-core box
    run = _loss_and_grad if name in ("htpo", "high_entropy_only") else _loss_and_grad.__wrapped__

    def accumulated(micros):
        """(sum of the micro losses, their gradients w.r.t. log_prob scattered back to [N, R])."""
        total, grad = 0.0, np.zeros_like(rm)
        for micro in micros:
            mb = packing.gather(batch, micro)
            x = LossInputs(
                *map(jnp.asarray, (_cut(lp, micro), mb.old_log_prob, mb.advantages)),
                response_mask=jnp.asarray(mb.response_mask),
                entropy=jnp.asarray(_cut(ent, micro)),
                hard=jnp.asarray(mb.hard),
                correct=jnp.asarray(mb.correct),
            )
            loss, g = run(x, num_tokens, num_seqs, name=name, config=cfg)
            g = np.asarray(g)
            assert not g[:, rm.shape[1] :].any() and not g[micro.rows < 0].any()
            packing.scatter(g, micro, grad)
            total += float(loss)
        return total, grad

    plan = packing.plan(packing.response_extent(rm), 6, max_tokens=60, multiple=8, cap=rm.shape[1])
    assert len({m.width for m in plan}) > 1 and any((m.rows < 0).any() for m in plan)
    packed = accumulated(plan)
    assert abs(packed[0]) > 1e-3
    refs = {
        "padded": accumulated([packing.Micro(m.rows, rm.shape[1]) for m in plan]),
        "wider": accumulated([packing.Micro(m.rows, MAX_RESPONSE) for m in plan]),
    }
    if name != "high_entropy_only":
        refs["one batch"] = accumulated([packing.Micro(np.arange(8), rm.shape[1])])
        halves = (np.arange(4), np.arange(4, 8))
        refs["accumulated"] = accumulated([packing.Micro(h, rm.shape[1]) for h in halves])
    for what, (loss, grad) in refs.items():
        np.testing.assert_allclose(packed[0], loss, rtol=1e-5, atol=1e-7, err_msg=what)
        np.testing.assert_allclose(packed[1], grad, rtol=1e-5, atol=1e-8, err_msg=what)


def test_packed_scoring_equals_padded():
    _, graphdef, params, _ = _setup("htpo")
    batch = random_update_batch(n=8, p=6, r=40, seed=5)
    lp_ref, ent_ref = score_responses(
        graphdef, params, batch.input_ids, batch.attention_mask, 6, 1.0
    )
    m = np.asarray(batch.response_mask)
    lp, ent = np.zeros_like(m), np.zeros_like(m)
    for micro in packing.plan(packing.response_extent(m), 6, max_tokens=60, multiple=8, cap=40):
        mb = packing.gather(batch, micro)
        out = score_responses(graphdef, params, mb.input_ids, mb.attention_mask, 6, 1.0)
        packing.scatter(out[0], micro, lp)
        packing.scatter(out[1], micro, ent)
    np.testing.assert_allclose(lp * m, np.asarray(lp_ref) * m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent * m, np.asarray(ent_ref) * m, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_trainer_with_token_budget_matches_padded_run(tiny_run_dir, tmp_path):
    """Two RL steps with token-budget micro-batches (KL on: the reference pass is packed too)
    log the same losses as padded micro-batches: same rollouts, same math, other shapes."""
    runs = {}
    for name, budget in (("padded", 0), ("packed", 40)):
        out = tmp_path / name
        extra = {
            "trainer.total_steps": 2,
            "checkpoint.save_every": 0,
            "optim.mini_batch_size": 2,
            "algorithm.use_kl_loss": True,
            "optim.max_tokens_per_micro": budget,
        }
        main(overrides(tiny_run_dir, out, **extra))
        runs[name] = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    for step in (1, 2):
        for key in ("train/loss", "train/kl_loss", "train/entropy", "train/grad_norm"):
            a, b = runs["padded"][step][key], runs["packed"][step][key]
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (step, key)


def test_fixed_micro_batches_are_equal_width_rows_in_order():
    micros = packing.fixed(10, 4, 40)
    assert [m.rows.tolist() for m in micros] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert {m.width for m in micros} == {40}


def test_the_trainer_update_path_equals_the_scanned_update_with_token_weighted_metrics():
    """Fixed-size micro-batches run through the trainer's one path (`packed_update` over
    `packing.fixed`); it equals the scanned `jit_update` on [n_micro, micro] (which now ends in
    `apply_grads`), and both weight non-loss metrics by each micro-batch's tokens."""
    sc, graphdef, params, tx = _setup("htpo", "token-mean")
    batch = random_update_batch(n=8, p=6, r=40, seed=5)
    rmask = np.asarray(batch.response_mask)
    rmask[:4, 10:] = 0  # the first micro-batch has far fewer tokens than the second
    batch = batch.replace(response_mask=rmask)
    mini = jax.tree.map(lambda x: jnp.asarray(x).reshape(2, 4, *x.shape[1:]), batch)
    ref, m_ref = jit_update(graphdef, tx, sc)(_state(params, tx), mini)
    micros = packing.fixed(8, 4, 40)
    dev = [jax.tree.map(jnp.asarray, packing.gather(batch, m)) for m in micros]
    grads_fn = jit_micro_grads(graphdef, sc)
    new, m_new = packed_update(
        _state(params, tx), dev, jnp.float32(rmask.sum()),
        jnp.float32((rmask > 0).any(-1).sum()), grads_fn, jit_apply_grads(tx),
        lambda: jax.tree.map(jnp.zeros_like, params),
    )  # fmt: skip
    assert set(m_new) == set(m_ref)
    for k in m_ref:
        np.testing.assert_allclose(m_new[k], m_ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # token weighting: the micro-batches' own values, weighted by their token counts
    zeros = jax.tree.map(jnp.zeros_like, params)
    n_tok, n_seq = jnp.float32(rmask.sum()), jnp.float32((rmask > 0).any(-1).sum())
    per = [grads_fn(jax.tree.map(jnp.copy, zeros), params, d, n_tok, n_seq)[1] for d in dev]
    w = np.array([rmask[:4].sum(), rmask[4:].sum()], np.float64)
    want = sum(float(p["pg_clipfrac"]) * wi for p, wi in zip(per, w / w.sum(), strict=True))
    np.testing.assert_allclose(float(m_new["pg_clipfrac"]), want, rtol=1e-5, atol=1e-7)
