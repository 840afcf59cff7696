"""htpo_loss and the baselines: official golden cases, spec properties, edge rows, accumulation,
the Dr. GRPO divisor, input checks, float16 counts and inert masked slots."""

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_loss_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from htpo_jax.rl.loss import (
    AGG_MODES,
    GROUP_NAMES,
    LOSSES,
    LossConfig,
    LossInputs,
    aggregate,
    dapo_loss,
    dr_grpo_loss,
    entropy_split,
    grpo_loss,
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


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 37]))
def test_invariant_to_padding_and_permutation(seed, pad):
    lp, old, ent, adv, mask, hard, correct = random_loss_batch(4, 50, seed)
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
    lp, old, ent, adv, mask, hard, correct = random_loss_batch(8, 64, 3)
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
    lp, old, ent, adv, mask, hard, correct = random_loss_batch(8, 40, 5)
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
    lp, old, ent, adv, mask, hard, correct = map(jnp.asarray, random_loss_batch(6, 30, 4))
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
    lp, old, ent, adv, mask, hard, correct = random_loss_batch(6, 30, 9)
    top = np.argmax(np.where(mask > 0, ent, -1), axis=1)
    lp[np.arange(6), top] = old[np.arange(6), top]
    cfg = LossConfig(high_entropy_ratio=0.0)
    falses = np.zeros(6, bool)
    got, _ = htpo_loss(*map(jnp.asarray, (lp, old, ent, adv, mask, hard, falses)), config=cfg)
    want, _ = dapo_loss(*map(jnp.asarray, (lp, old, adv, mask)), config=cfg)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_high_entropy_only_uses_batch_top_fraction():
    lp, old, ent, adv, mask, _, _ = random_loss_batch(4, 50, 11)
    _, m = high_entropy_only_loss(*map(jnp.asarray, (lp, old, ent, adv, mask)))
    n = mask.sum()
    k = max(int(0.2 * n), 1)
    tau = np.sort(ent[mask > 0])[::-1][k - 1]
    np.testing.assert_allclose(m["high_entropy_frac"], (ent[mask > 0] >= tau).mean(), rtol=1e-6)


def test_high_entropy_only_with_the_trainers_token_count():
    """The trainer passes every loss the mini-batch's valid-token count: for one batch (no ties in
    H) high_entropy_only then equals its own token-mean over the tokens it selects (it was
    divided by all valid tokens, 1 / rho times too small)."""
    lp, old, ent, adv, mask, _, _ = map(jnp.asarray, random_loss_batch(4, 50, 12))
    alone, _ = high_entropy_only_loss(lp, old, ent, adv, mask)
    counted, _ = high_entropy_only_loss(lp, old, ent, adv, mask, num_tokens=jnp.sum(mask))
    np.testing.assert_allclose(counted, alone, rtol=1e-6)
    assert abs(float(alone)) > 1e-4


def test_bfloat16_is_preserved_and_jittable():
    args = random_loss_batch(4, 32, 2, dtype=jnp.bfloat16)
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
        dict(clip_ratio_low=np.float32(1.5)),
        dict(clip_ratio_high=True),
        dict(max_response_length=0),
        dict(max_response_length=64.5),
        dict(max_response_length=True),
    ],
)
def test_config_errors_name_the_field(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        LossConfig(**kw)


def test_config_takes_numpy_scalars():
    """np.float32(0.2) was refused as out of range (only Python int / float passed the check)."""
    cfg = LossConfig(
        clip_ratio_low=np.float32(0.2),
        clip_ratio_high=np.float64(0.28),
        clip_ratio_c=np.int64(10),
        max_response_length=np.int32(64),
    )
    assert cfg.clip_ratio_low == float(np.float32(0.2)) and type(cfg.clip_ratio_low) is float
    assert cfg.clip_ratio_c == 10.0 and cfg.max_response_length == 64
    assert type(cfg.max_response_length) is int
    hash(cfg)  # a static jit argument
    lp, old, ent, adv, mask, hard, correct = map(jnp.asarray, random_loss_batch(4, 20, 1))
    got, _ = jax.jit(htpo_loss, static_argnames="config")(
        lp, old, ent, adv, mask, hard, correct, config=cfg
    )
    np.testing.assert_allclose(got, htpo_loss(lp, old, ent, adv, mask, hard, correct)[0], 1e-6)


def test_dr_grpo_does_not_depend_on_padding():
    """Dr. GRPO divides each response's token sum by a constant (the maximum response length):
    padding the same responses from 32 to 64 or 100 columns (garbage in the padding) changes
    neither the loss nor the gradient. It divided by the width: padding to 64 halved it."""
    lp, old, _, adv, mask, _, _ = random_loss_batch(4, 32, 1)
    cfg = LossConfig(max_response_length=64)
    f = jax.value_and_grad(lambda p, *a, **kw: dr_grpo_loss(p, *a, **kw)[0])

    def padded(width, config):
        pad = lambda x, v: np.pad(x, ((0, 0), (0, width - 32)), constant_values=v)
        args = [pad(x, 7.0) for x in (lp, old, adv)] + [pad(mask, 0.0)]
        loss, grad = f(*map(jnp.asarray, args), config=config)
        assert not np.asarray(grad)[:, 32:].any()
        return float(loss), np.asarray(grad)[:, :32]

    want = padded(32, cfg)
    assert abs(want[0]) > 1e-3
    for width in (64, 100):
        got = padded(width, cfg)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, err_msg=str(width))
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-9, err_msg=str(width))
    # The divisor is the constant: the mean over responses of (token sum / 64).
    loss_bt = jnp.asarray(lp) - jnp.asarray(old)  # any per-token values
    got = aggregate(loss_bt, mask, "seq-mean-token-sum-norm", max_response_length=64)
    want_sum = (np.asarray(loss_bt) * mask).sum(-1) / 64
    np.testing.assert_allclose(got, want_sum.mean(), rtol=1e-6)
    # Without it (library callers), the documented fallback: the arrays' width T.
    assert padded(32, LossConfig())[0] == pytest.approx(2 * want[0], rel=1e-6)
    assert padded(64, LossConfig())[0] == pytest.approx(want[0], rel=1e-6)


def _clipped_args(x):
    return (x.log_prob, x.old_log_prob, x.advantages, x.response_mask)


# (entry, positional arguments from a LossInputs), one per public loss
ENTRIES = {
    "htpo_loss": (
        htpo_loss,
        lambda x: (
            x.log_prob,
            x.old_log_prob,
            x.entropy,
            x.advantages,
            x.response_mask,
            x.hard,
            x.correct,
        ),
    ),
    "dapo_loss": (dapo_loss, _clipped_args),
    "grpo_loss": (grpo_loss, _clipped_args),
    "dr_grpo_loss": (dr_grpo_loss, _clipped_args),
    "high_entropy_only_loss": (
        high_entropy_only_loss,
        lambda x: (x.log_prob, x.old_log_prob, x.entropy, x.advantages, x.response_mask),
    ),
}


def _inputs(b=4, t=16, seed=4):
    lp, old, ent, adv, mask, hard, correct = map(jnp.asarray, random_loss_batch(b, t, seed))
    return LossInputs(lp, old, adv, mask, entropy=ent, hard=hard, correct=correct)


# (field, how it is spoiled, the message): the spoiled inputs broadcast and gave another loss
BAD_SHAPES = [
    ("response_mask", lambda m: m[:1], "response_mask has shape (1, 16), expected (4, 16)"),
    ("response_mask", lambda m: m[0], "response_mask has shape (16,), expected (4, 16)"),
    ("old_log_prob", lambda x: x[:1], "old_log_prob has shape (1, 16), expected (4, 16)"),
    ("advantages", lambda x: x[:, :1], "advantages has shape (4, 1), expected (4, 16)"),
    ("log_prob", lambda x: x[None], "log_prob must be [B, T], got shape (1, 4, 16)"),
    ("entropy", lambda x: x[:1], "entropy has shape (1, 16), expected (4, 16)"),
    ("hard", lambda h: h[:1], "hard has shape (1,), expected (4,)"),
    ("correct", lambda c: c[:, None], "correct has shape (4, 1), expected (4,)"),
]


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_wrong_shapes_raise_naming_the_argument(entry, jit):
    fn, args_of = ENTRIES[entry]
    f = jax.jit(fn) if jit else fn
    x = _inputs()
    fn(*args_of(x))  # well-formed: no error
    tried = 0
    for field, spoil, msg in BAD_SHAPES:
        bad = dataclasses.replace(x, **{field: spoil(getattr(x, field))})
        if all(a is b for a, b in zip(args_of(bad), args_of(x), strict=True)):  # not read
            continue
        tried += 1
        with pytest.raises(ValueError, match=re.escape(f"{entry}: {msg}")):
            f(*args_of(bad))
    assert tried >= 5


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_wrong_dtypes_raise_naming_the_argument(entry):
    fn, args_of = ENTRIES[entry]
    x = _inputs()
    bad_fields = {
        "log_prob": x.log_prob.astype(jnp.int32),
        "advantages": jnp.sign(x.advantages).astype(jnp.int32),
        "hard": x.hard.astype(jnp.float32) + 0.4,
    }
    for field, value in bad_fields.items():
        bad = dataclasses.replace(x, **{field: value})
        if all(a is b for a, b in zip(args_of(bad), args_of(x), strict=True)):
            continue
        with pytest.raises(ValueError, match=rf"{entry}: {field} must be a"):
            fn(*args_of(bad))
    with pytest.raises(ValueError, match="required"):
        fn(*(None if a is x.old_log_prob else a for a in args_of(x)))


@pytest.mark.parametrize("bad", [0, -3, 2.5, float("nan"), np.float32(0.5), True, np.ones(2)])
def test_bad_counts_raise(bad):
    """A host `num_tokens` / `num_sequences` that is not a positive whole number raises (0, -3
    and 2.5 were clamped to 1 or used as given, silently)."""
    x = _inputs()
    for entry, (fn, args_of) in ENTRIES.items():
        for kw in ("num_tokens", "num_sequences"):
            with pytest.raises(ValueError, match=rf"{entry}: {kw} must be a"):
                fn(*args_of(x), **{kw: bad})
    with pytest.raises(ValueError, match="aggregate: num_tokens"):
        aggregate(x.log_prob, x.response_mask, num_tokens=bad)


def test_counts_accepted_as_numbers_and_traced():
    x = _inputs()
    n = float(x.response_mask.sum())
    want, _ = dapo_loss(*_clipped_args(x))
    for count in (int(n), n, np.float32(n), np.int64(n), jnp.float32(n)):
        got, _ = dapo_loss(*_clipped_args(x), num_tokens=count)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # traced: not read (no device sync); a traced 0 (an empty mini-batch) is no error
    f = jax.jit(lambda n, *a: htpo_loss(*a, num_tokens=n, num_sequences=n)[0])
    args = ENTRIES["htpo_loss"][1](x)
    assert np.isfinite(float(f(jnp.float32(0), *args)))
    np.testing.assert_allclose(f(jnp.float32(n), *args), htpo_loss(*args)[0], rtol=1e-6)


@pytest.mark.parametrize("name", ["htpo", "dapo", "high_entropy_only", "sft"])
def test_float16_counts_do_not_overflow(name):
    """80,000 float16 tokens: counted in float16 the count was inf (max 65,504), the loss 0 and
    the gradient zero. Sums and counts are float32 now; the loss keeps the input dtype."""
    b, t = 4, 20_000
    lp, old, ent, adv, mask, hard, correct = random_loss_batch(b, t, 2)
    mask[:] = 1.0

    def run(dtype):
        fl = lambda a: jnp.asarray(a, dtype)
        x = LossInputs(fl(lp), fl(old), fl(adv), fl(mask), fl(ent), jnp.asarray(hard), correct)
        f = lambda p: LOSSES[name](dataclasses.replace(x, log_prob=p), num_tokens=b * t)[0]
        loss, g = jax.value_and_grad(f)(x.log_prob)
        return loss, np.asarray(g, np.float64)

    want, want_g = run(jnp.float32)
    got, g = run(jnp.float16)
    assert got.dtype == jnp.float16 and abs(float(want)) > 1e-2
    np.testing.assert_allclose(float(got), float(want), rtol=1e-2)
    np.testing.assert_allclose(np.abs(g).sum(), np.abs(want_g).sum(), rtol=3e-2)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_masked_slots_are_inert(name, agg):
    """NaN / -inf / inf at masked slots (of log-probs, old log-probs, advantages, entropies)
    give the same loss and gradient as zeros there, and exactly 0 gradient at those slots (a
    masked -inf log-prob gave NaN through exp(lp - sg(lp)))."""
    lp, old, ent, adv, mask, hard, correct = random_loss_batch(5, 24, 6)
    mask[:, 5] = 0.0  # holes, and a row with none
    mask[3] = 0.0
    masked = mask == 0

    def run(fill):
        def spoil(a, v):
            return np.where(masked, v, a).astype(np.float32) if fill else a * mask

        arrays = (spoil(lp, -np.inf), spoil(old, np.nan), spoil(adv, np.inf), spoil(ent, np.nan))
        x = LossInputs(*map(jnp.asarray, arrays[:3]), jnp.asarray(mask), jnp.asarray(arrays[3]),
                       jnp.asarray(hard), jnp.asarray(correct))  # fmt: skip
        cfg = LossConfig(loss_agg_mode=agg, max_response_length=32)
        f = lambda p: LOSSES[name](dataclasses.replace(x, log_prob=p), config=cfg)
        (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(x.log_prob)
        return float(loss), np.asarray(g), metrics

    loss, g, metrics = run(fill=True)
    clean_loss, clean_g, clean_metrics = run(fill=False)
    assert np.isfinite(loss) and np.isfinite(g).all()
    assert np.all(g[masked] == 0)
    assert loss == clean_loss
    np.testing.assert_array_equal(g, clean_g)
    for key, v in metrics.items():
        assert float(v) == float(clean_metrics[key]), key
