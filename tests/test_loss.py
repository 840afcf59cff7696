"""htpo_loss and the baselines: official golden cases, spec properties, edge rows, accumulation."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import run_on_fake_devices

from htpo_jax.rl.loss import (
    GROUP_NAMES,
    LOSSES,
    LossConfig,
    LossInputs,
    dapo_loss,
    entropy_split,
    high_entropy_only_loss,
    htpo_loss,
)

GOLDEN = np.load(Path(__file__).parent / "golden" / "htpo_loss_cases.npz")
N_CASES = int(GOLDEN["n_cases"])


GB, GT = 9, 400  # every golden case fits; padding rows/columns (mask 0) change nothing


def golden_case(j, dtype):
    """Case j padded to [GB, GT] so that one compiled function serves all cases."""
    a = {k: GOLDEN[f"{j}/{k}"] for k in ("old", "lp", "ent", "adv", "mask", "hard", "correct")}
    b, t = a["lp"].shape
    pad = lambda x: np.pad(x, ((0, GB - b), (0, GT - t)) if x.ndim == 2 else ((0, GB - b),))
    args = [jnp.asarray(pad(a[k]).astype(dtype)) for k in ("lp", "old", "ent", "adv", "mask")]
    return args + [jnp.asarray(pad(a["hard"])), jnp.asarray(pad(a["correct"]))], (b, t)


@jax.jit
def loss_and_grad(lp, *rest, **kw):
    f = lambda lp: htpo_loss(lp, *rest, **kw)
    return jax.value_and_grad(f, has_aux=True)(lp)


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_golden_cases(x64):
    dtype = np.float64 if x64 else np.float32
    rtol, atol = (1e-12, 1e-12) if x64 else (1e-5, 1e-6)
    with jax.enable_x64(x64):
        for j in range(N_CASES):
            args, (b, t) = golden_case(j, dtype)
            (loss, m), grad = loss_and_grad(*args)
            assert loss.dtype == dtype and grad.dtype == dtype
            msg = f"golden case {j}"
            grad = np.asarray(grad)
            assert not grad[b:].any() and not grad[:, t:].any()
            np.testing.assert_allclose(loss, GOLDEN[f"{j}/loss"], rtol=rtol, atol=atol, err_msg=msg)
            np.testing.assert_allclose(
                grad[:b, :t], GOLDEN[f"{j}/grad"], rtol=rtol, atol=atol, err_msg=msg
            )
            for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
                np.testing.assert_allclose(
                    m[key], GOLDEN[f"{j}/{key}"], rtol=rtol, atol=atol, err_msg=f"{msg} {key}"
                )


def reference_split(ent, mask, hard, correct, cfg=LossConfig()):
    """The spec's rules row by row with sorting, in numpy float64 (the slow, obvious way)."""
    high = np.zeros(ent.shape, bool)
    drop = np.zeros(ent.shape, bool)
    for i in range(ent.shape[0]):
        valid = mask[i] > 0
        h = ent[i][valid]
        n = len(h)
        if n == 0:
            continue
        k = max(int(cfg.high_entropy_ratio * n), 1)
        tau = np.sort(h)[::-1][k - 1]
        high[i] = valid & (ent[i] >= tau)
        low = valid & ~high[i]
        if correct[i] and hard[i] and low.any():
            k1 = max(int(cfg.drop_low_entropy_ratio * low.sum()), 1)
            v = np.sort(ent[i][low])[k1 - 1]
            drop[i] = low & (ent[i] < v)
        elif correct[i] and not hard[i]:
            k2 = max(int(cfg.drop_high_entropy_ratio * high[i].sum()), 1)
            v = np.sort(ent[i][high[i]])[::-1][k2 - 1]
            drop[i] = high[i] & (ent[i] >= v)
    return high, drop


@st.composite
def batches(draw, max_b=5, max_t=300):
    b = draw(st.sampled_from([1, 3, max_b]))  # few shapes: few compilations
    t = draw(st.sampled_from([1, 7, 64, max_t]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Few distinct values make ties (at tau and at the drop thresholds) common.
    levels = draw(st.sampled_from([3, 20, 0]))
    ent = rng.integers(0, levels, (b, t)).astype(np.float32) if levels else rng.gamma(1, 1, (b, t))
    ent = ent.astype(np.float32)
    lengths = rng.integers(0, t + 1, b)
    mask = np.arange(t)[None] < lengths[:, None]
    mask &= rng.random((b, t)) > draw(st.sampled_from([0.0, 0.3]))  # holes
    hard, correct = rng.random(b) < 0.5, rng.random(b) < 0.5
    return ent, mask.astype(np.float32), hard, correct


@settings(max_examples=60, deadline=None)
@given(batches())
def test_split_matches_reference_and_partitions(batch):
    ent, mask, hard, correct = batch
    high, drop = jax.jit(entropy_split, static_argnums=4)(
        ent, mask > 0, hard, correct, LossConfig()
    )
    high, drop = np.asarray(high), np.asarray(drop)
    ref_high, ref_drop = reference_split(ent.astype(np.float64), mask, hard, correct)
    np.testing.assert_array_equal(high, ref_high)
    np.testing.assert_array_equal(drop, ref_drop)
    valid = mask > 0
    n = valid.sum(-1)
    low = valid & ~high
    assert not (high & ~valid).any() and (high | low | ~valid).all()
    has = n > 0
    assert (high.sum(-1)[has] >= np.maximum((0.2 * n[has]).astype(int), 1)).all()
    n_low, n_high = low.sum(-1), high.sum(-1)
    for i in range(len(n)):
        if correct[i] and hard[i]:  # strict: at most k1 - 1 low tokens dropped
            assert drop[i].sum() <= max(int(0.006 * n_low[i]), 1) - 1
            assert not (drop[i] & high[i]).any()
        elif correct[i] and n_high[i]:  # inclusive: at least k2 high tokens dropped
            assert drop[i].sum() >= max(int(0.02 * n_high[i]), 1)
            assert not (drop[i] & low[i]).any()
        else:
            assert not drop[i].any()


def random_batch(b, t, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.normal(size=(b, t))) * 2
    lp = old + rng.normal(size=(b, t)) * 0.3
    ent = rng.gamma(1.0, 1.0, (b, t))
    adv = np.repeat(rng.normal(size=(b, 1)), t, 1)
    mask = np.arange(t)[None] < rng.integers(1, t + 1, (b, 1))
    hard, correct = rng.random(b) < 0.5, rng.random(b) < 0.5
    f = [x.astype(dtype) for x in (lp, old, ent, adv, mask)]
    return f + [hard, correct]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 37]))
def test_invariant_to_padding_and_permutation(seed, pad):
    lp, old, ent, adv, mask, hard, correct = random_batch(4, 50, seed)
    (loss, m), grad = loss_and_grad(*map(jnp.asarray, (lp, old, ent, adv, mask, hard, correct)))

    padded = [np.pad(x, ((0, 0), (0, pad)), constant_values=7.0) for x in (lp, old, ent, adv)]
    pmask = np.pad(mask, ((0, 0), (0, pad)))
    (loss_p, m_p), grad_p = loss_and_grad(*map(jnp.asarray, (*padded, pmask, hard, correct)))
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad_p)[:, :50], grad, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad_p)[:, 50:] == 0)

    perm = np.random.default_rng(seed).permutation(50)
    permuted = [x[:, perm] for x in (lp, old, ent, adv, mask)]
    (loss_q, m_q), grad_q = loss_and_grad(*map(jnp.asarray, (*permuted, hard, correct)))
    np.testing.assert_allclose(loss_q, loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad_q), np.asarray(grad)[:, perm], rtol=1e-5, atol=1e-7)
    for key in m:
        np.testing.assert_allclose(m_p[key], m[key], rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(m_q[key], m[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_edge_rows_no_error_no_nan():
    t = 6
    ent = np.array(
        [
            [1, 2, 3, 4, 5, 6],
            [3, 3, 3, 3, 3, 3],
            [2, 0, 0, 0, 0, 0],
            [1, 2, 3, 4, 5, 6],
            [5, 5, 5, 1, 1, 1],
        ],
        np.float32,
    )
    mask = np.array([[0] * t, [1] * t, [1] + [0] * 5, [1] * t, [1] * t], np.float32)
    b = len(ent)
    lp = np.full((b, t), -1.0, np.float32)
    old = lp - 0.5
    adv = np.ones((b, t), np.float32)
    hard = np.array([True, True, True, False, True])
    correct = np.array([True, True, True, True, False])
    (loss, m), grad = loss_and_grad(*map(jnp.asarray, (lp, old, ent, adv, mask, hard, correct)))
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert all(np.isfinite(v) for v in m.values())
    assert np.all(np.asarray(grad)[0] == 0)  # the empty row contributes nothing
    high, drop = entropy_split(jnp.asarray(ent), jnp.asarray(mask > 0), hard, correct, LossConfig())
    assert np.asarray(high)[1].all() and not np.asarray(drop)[1].any()  # all equal: all high
    assert np.asarray(high)[2, 0] and not np.asarray(drop)[2].any()  # one token: high, no drop
    # Everything masked: a zero loss, still no NaN.
    (loss0, m0), g0 = loss_and_grad(*map(jnp.asarray, (lp, old, ent, adv, 0 * mask, hard, correct)))
    assert float(loss0) == 0 and not np.asarray(g0).any()
    assert all(np.isfinite(v) for v in m0.values())


def test_group_fractions_sum_to_one_and_entropy_means():
    lp, old, ent, adv, mask, hard, correct = random_batch(8, 64, 3)
    _, m = htpo_loss(*map(jnp.asarray, (lp, old, ent, adv, mask, hard, correct)))
    total = sum(float(m[f"group_frac/{g}"]) for g in GROUP_NAMES)
    assert abs(total - 1.0) < 1e-6
    assert float(m["entropy_high_mean"]) > float(m["entropy_low_mean"])


def batch_top_fraction(ent, valid, ratio=0.2):
    """high_entropy_only's selection by hand: valid & H >= the k-th largest valid H of the batch,
    k = max(floor(ratio n), 1)."""
    k = max(int(ratio * valid.sum()), 1)
    tau = np.sort(ent[valid])[::-1][k - 1]
    return valid & (ent >= tau)


@pytest.mark.parametrize("name", list(LOSSES))
def test_accumulation_over_micro_batches_equals_one_batch(name):
    """Every LOSSES entry takes one `LossInputs`; halves with the whole batch's counts add up to
    the whole batch. high_entropy_only selects per (micro-)batch, so its halves add up to the
    clipped loss over the union of the halves' selections, divided by the count a selection over
    the whole batch keeps, max(floor(0.2 N), 1)."""
    lp, old, ent, adv, mask, hard, correct = random_batch(8, 40, 5)
    fn = LOSSES[name]

    def call(sl, mask=mask, **kw):
        x = LossInputs(*(jnp.asarray(a[sl]) for a in (lp, old, adv, mask, ent, hard, correct)))
        f = lambda p: fn(dataclasses.replace(x, log_prob=p), **kw)[0]
        return jax.value_and_grad(f)(x.log_prob)

    n_tok = mask.sum()
    if name == "high_entropy_only":
        valid = mask > 0
        union = np.concatenate(
            [batch_top_fraction(ent[s], valid[s]) for s in (slice(0, 4), slice(4, 8))]
        )
        assert 0 < union.sum() < valid.sum()
        kept = max(int(0.2 * valid.sum()), 1)
        want_loss, want_grad = jax.value_and_grad(
            lambda p: dapo_loss(
                p, *map(jnp.asarray, (old, adv, union.astype(mask.dtype))), num_tokens=kept
            )[0]
        )(jnp.asarray(lp))
    else:
        want_loss, want_grad = call(slice(None))
    halves = [
        call(slice(0, 4), num_tokens=n_tok, num_sequences=8),
        call(slice(4, 8), num_tokens=n_tok, num_sequences=8),
    ]
    np.testing.assert_allclose(halves[0][0] + halves[1][0], want_loss, rtol=1e-5)
    np.testing.assert_allclose(
        np.concatenate([halves[0][1], halves[1][1]]), want_grad, rtol=1e-5, atol=1e-8
    )


def test_registry_entries_equal_the_public_functions():
    """LOSSES["htpo"](LossInputs) is htpo_loss with its documented positional arguments."""
    lp, old, ent, adv, mask, hard, correct = map(jnp.asarray, random_batch(6, 30, 4))
    x = LossInputs(lp, old, adv, mask, entropy=ent, hard=hard, correct=correct)
    got, got_m = LOSSES["htpo"](x, num_tokens=jnp.sum(mask))
    want, want_m = htpo_loss(lp, old, ent, adv, mask, hard, correct, num_tokens=jnp.sum(mask))
    assert float(got) == float(want) and got_m.keys() == want_m.keys()
    got, _ = LOSSES["dapo"](x)
    assert float(got) == float(dapo_loss(lp, old, adv, mask)[0])
    got, _ = LOSSES["sft"](x)  # the assets script's SFT: mean NLL of the response tokens
    np.testing.assert_allclose(got, -(lp * mask).sum() / mask.sum(), rtol=1e-6)


def test_dapo_is_htpo_without_groups():
    """With rho = 0 only the top-entropy token of a row is high; on wrong responses with r = 1
    there, every token gets the plain clipped loss, so HTPO equals DAPO."""
    lp, old, ent, adv, mask, hard, correct = random_batch(6, 30, 9)
    top = np.argmax(np.where(mask > 0, ent, -1), axis=1)
    lp[np.arange(6), top] = old[np.arange(6), top]
    cfg = LossConfig(high_entropy_ratio=0.0)
    falses = np.zeros(6, bool)
    got, _ = htpo_loss(*map(jnp.asarray, (lp, old, ent, adv, mask, hard, falses)), config=cfg)
    want, _ = dapo_loss(*map(jnp.asarray, (lp, old, adv, mask)), config=cfg)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_high_entropy_only_uses_batch_top_fraction():
    lp, old, ent, adv, mask, _, _ = random_batch(4, 50, 11)
    _, m = high_entropy_only_loss(*map(jnp.asarray, (lp, old, ent, adv, mask)))
    n = mask.sum()
    k = max(int(0.2 * n), 1)
    tau = np.sort(ent[mask > 0])[::-1][k - 1]
    np.testing.assert_allclose(m["high_entropy_frac"], (ent[mask > 0] >= tau).mean(), rtol=1e-6)


def test_high_entropy_only_with_the_trainers_token_count():
    """The trainer passes every loss the mini-batch's valid-token count: for one batch (no ties in
    H) high_entropy_only then equals its own token-mean over the tokens it selects (it was
    divided by all valid tokens, 1 / rho times too small)."""
    lp, old, ent, adv, mask, _, _ = map(jnp.asarray, random_batch(4, 50, 12))
    alone, _ = high_entropy_only_loss(lp, old, ent, adv, mask)
    counted, _ = high_entropy_only_loss(lp, old, ent, adv, mask, num_tokens=jnp.sum(mask))
    np.testing.assert_allclose(counted, alone, rtol=1e-6)
    assert abs(float(alone)) > 1e-4


def test_bfloat16_is_preserved_and_jittable():
    args = random_batch(4, 32, 2, dtype=jnp.bfloat16)
    loss, m = jax.jit(htpo_loss)(*map(jnp.asarray, args))
    assert loss.dtype == jnp.bfloat16 and np.isfinite(float(loss))


@pytest.mark.parametrize(
    "kw",
    [
        dict(clip_ratio_low=1.5),
        dict(clip_ratio_c=0.5),
        dict(high_entropy_ratio=-0.1),
        dict(drop_low_entropy_ratio="a"),
        dict(loss_agg_mode="mean"),
    ],
)
def test_config_errors_name_the_field(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        LossConfig(**kw)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, {tests!r})
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from test_loss import random_batch
from htpo_jax.rl.loss import htpo_loss
assert jax.device_count() == 8
args = [jnp.asarray(x) for x in random_batch(16, 96, 4)]
f = jax.jit(jax.value_and_grad(lambda lp, *a: htpo_loss(lp, *a)[0]))
want = f(*args)
mesh = Mesh(np.array(jax.devices()), ("data",))
sh = [jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1))))) for x in args]
got = f(*sh)
assert len(got[1].sharding.device_set) == 8
np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-9)
print("OK")
"""


@pytest.mark.slow  # a fresh process with fake devices
def test_sharded_batch_matches_unsharded():
    run_on_fake_devices(SHARDED, 8)
