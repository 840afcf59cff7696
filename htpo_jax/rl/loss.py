"""Token-level policy losses: HTPO (the paper's objective) and the baselines it is compared with.

All functions take `[B, T]` arrays (B responses, T token slots), are jittable with static shapes,
have no Python loop over rows and no host sync, return the input float dtype (sums and counts
are taken in float32, float64 for float64 inputs), and work with the batch axis sharded. The
rules are those of the official implementation (see docs/LOSS.md):

    r = exp(clip(lp - old, -20, 20)),  P = -A r,  C = -A clip(r, 1 - eps_l, 1 + eps_h),
    M = max(P, C)                                   (PPO/DAPO clipped loss, clip-higher)
    L = min(-A c, L) where A < 0                    (dual clip)
    loss = sum(m L) / sum(m)                        (token-mean)

HTPO splits each response's valid tokens into high entropy (H >= tau, tau = the k-th largest H of
the row, k = max(floor(rho n), 1)) and low, and with the prompt's difficulty (hard/easy) and the
response's correctness gives 8 groups; groups G2, G4, G8 replace M by a fixed-size push (I is 1
with gradient 1, sg is stop-gradient):

    G2 hard correct high: (1+eps_h) A I if r > 1+eps_h;  sg(exp(old-lp)) A I if r < 1-eps_l;  else P
    G4/G8 wrong high:     (1-eps_l) A I if r < 1-eps_l;  else P
    G1 hard correct low:  M, but 0 on the lowest-entropy low tokens (H < k1-th smallest of low)
    G6 easy correct high: M, but 0 on the highest-entropy high tokens (H >= k2-th largest of high)
    G3, G5, G7:           M

Every public entry checks its inputs on static shapes, dtypes and Python values only (so it runs
unchanged under `jax.jit`) and raises `ValueError` naming the argument: per-token arrays `[B, T]`
of one shape, `hard` / `correct` `[B]`, floating log-probs / entropies / advantages, counts
(`num_tokens`, `num_sequences`) positive whole numbers when given as host numbers. Masked slots
are inert: their values (NaN, -inf, anything) give exactly 0 loss and 0 gradient.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from htpo_jax.rl.selection import key_values, kth_largest_keys, masked_keys, ordered_keys

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
GROUP_NAMES = (
    "hard_correct_low",
    "hard_correct_high",
    "hard_wrong_low",
    "hard_wrong_high",
    "easy_correct_low",
    "easy_correct_high",
    "easy_wrong_low",
    "easy_wrong_high",
)


# The loss's hyper-parameter bounds, one (predicate, "must be ...") per numeric field of
# LossConfig. They live here only: LossConfig checks them, and the run config (htpo_jax.config)
# uses the same entries for its `algorithm.<field>` keys, so `--set` and a direct LossConfig
# agree on what is allowed.
_SHARE = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
LOSS_BOUNDS = {
    "clip_ratio_low": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "clip_ratio_high": (lambda v: v >= 0.0, "must be >= 0"),
    "clip_ratio_c": (lambda v: v > 1.0, "must be > 1"),
    "high_entropy_ratio": _SHARE,
    "drop_low_entropy_ratio": _SHARE,
    "drop_high_entropy_ratio": _SHARE,
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the clipped objectives; defaults are the paper's.

    `max_response_length`: the constant divisor of `seq-mean-token-sum-norm` (Dr. GRPO divides
    each response's token sum by the maximum response length, a constant of the run). The trainer
    sets it from `rollout.max_response_length`. None (the default, for library callers) divides
    by the arrays' width `T` instead, which is that constant only if every call pads responses
    to the maximum length. Numeric fields accept numpy scalars (stored as Python numbers).
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    high_entropy_ratio: float = 0.2
    drop_low_entropy_ratio: float = 0.006
    drop_high_entropy_ratio: float = 0.02
    loss_agg_mode: str = "token-mean"
    max_response_length: int | None = None

    def __post_init__(self):
        for name, (ok, want) in LOSS_BOUNDS.items():
            v = getattr(self, name)
            if _is_bool(v) or not isinstance(v, numbers.Real) or not ok(v):
                raise ValueError(f"LossConfig.{name} {want}, got {v!r}")
            if not isinstance(v, int | float):  # a numpy scalar: hash and print as Python's
                object.__setattr__(self, name, float(v))
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(
                f"LossConfig.loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}"
            )
        n = self.max_response_length
        if n is not None:
            if _is_bool(n) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"LossConfig.max_response_length must be an int >= 1, got {n!r}")
            object.__setattr__(self, "max_response_length", int(n))


def _is_bool(v) -> bool:
    return isinstance(v, bool | np.bool_)


def _acc_dtype(dtype):
    """The dtype sums and counts are taken in: float32, or float64 for float64 inputs. A count
    in float16 overflows at 65,504 tokens (the loss became 0 with a zero gradient) and one in
    bfloat16 is inexact above 256."""
    return jnp.promote_types(dtype, jnp.float32)


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_count(fn: str, name: str, v) -> None:
    """A count given as a host number must be a positive whole number (0, negative or fractional
    counts were clamped to 1 or used as given, silently). A jax array (traced under jit, or on
    a device) is only checked for its shape: reading its value would sync with the device."""
    if v is None:
        return
    if jnp.ndim(v) != 0:
        raise ValueError(f"{fn}: {name} must be a scalar, got shape {jnp.shape(v)}")
    if isinstance(v, jax.Array):
        return
    x = np.asarray(v).item()
    whole = isinstance(x, numbers.Real) and math.isfinite(x) and x == int(x)
    if _is_bool(x) or not whole or x < 1:
        raise ValueError(f"{fn}: {name} must be a positive whole count, got {v!r}")


def _check_inputs(fn: str, per_token: dict, floats=(), flags: dict | None = None) -> None:
    """Shapes and dtypes of a loss's inputs, static only (works on tracers): every per-token
    array has the first one's `[B, T]` shape, the flags are `[B]`, `floats` are floating point.
    Broadcasting a `[1, T]` mask or a `[B - 1, T]` array gave another loss, silently."""
    ref_name = next(iter(per_token))
    for name, x in {**per_token, **(flags or {})}.items():
        if x is None:
            raise ValueError(f"{fn}: {name} is required")
    ref = jnp.shape(per_token[ref_name])
    if len(ref) != 2:
        raise ValueError(f"{fn}: {ref_name} must be [B, T], got shape {ref}")
    for name, x in per_token.items():
        if jnp.shape(x) != ref:
            raise ValueError(
                f"{fn}: {name} has shape {jnp.shape(x)}, expected {ref} (the shape of {ref_name})"
            )
    for name in floats:
        dt = _dtype(per_token[name])
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"{fn}: {name} must be a floating-point array, got dtype {dt}")
    for name, x in (flags or {}).items():
        if jnp.shape(x) != ref[:1]:
            raise ValueError(
                f"{fn}: {name} has shape {jnp.shape(x)}, expected {ref[:1]} (one flag per row "
                f"of {ref_name}, shape {ref})"
            )
        dt = _dtype(x)
        if not (jnp.issubdtype(dt, jnp.bool_) or jnp.issubdtype(dt, jnp.integer)):
            raise ValueError(f"{fn}: {name} must be a bool array, got dtype {dt}")


def _inert(valid, *arrays):
    """`arrays` with their masked slots set to 0, before any arithmetic: a NaN or -inf there
    would otherwise reach the gradient (0 x NaN in exp(lp - sg(lp))'s derivative, for one), while
    `where` passes exactly 0 back to a slot it did not select. Unmasked values are unchanged."""
    return tuple(jnp.where(valid, x, jnp.zeros_like(x)) for x in arrays)


def _count_table(ratio: float, size: int) -> jax.Array:
    """max(floor(ratio n), 1) for n = 0..size, with the float64 product truncated as Python does."""
    return jnp.asarray([max(int(ratio * n), 1) for n in range(size + 1)], jnp.int32)


def _masked_mean(x, mask, dtype):
    """Mean of x over mask, summed and counted in `dtype` (an `_acc_dtype`)."""
    total = jnp.sum(jnp.where(mask, x, 0).astype(dtype))
    return total / jnp.maximum(jnp.sum(mask, dtype=dtype), 1)


def aggregate(
    loss_bt,
    mask_bt,
    mode="token-mean",
    num_tokens=None,
    num_sequences=None,
    *,
    max_response_length=None,
):
    """verl's `agg_loss` of a `[B, T]` per-token loss over `mask_bt > 0`, in float32 (float64 for
    float64 inputs), returned in `loss_bt`'s dtype.

    `num_tokens` / `num_sequences` are the whole mini-batch's counts when a caller accumulates
    gradients over micro-batches; by default this batch's counts are used. Modes:
    token-mean sum(m L) / num_tokens; seq-mean-token-mean mean_i(sum_t(m L) / n_i);
    seq-mean-token-sum mean_i(sum_t(m L)); seq-mean-token-sum-norm mean_i(sum_t(m L) / D), D =
    `max_response_length` (a constant: the same for padded, packed and accumulated batches), or
    T when it is None. The means over responses count those with a token (or `num_sequences`).
    """
    _check_inputs("aggregate", {"loss_bt": loss_bt, "mask_bt": mask_bt})
    _check_count("aggregate", "num_tokens", num_tokens)
    _check_count("aggregate", "num_sequences", num_sequences)
    _check_count("aggregate", "max_response_length", max_response_length)
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    loss_bt = jnp.asarray(loss_bt)
    acc = _acc_dtype(loss_bt.dtype)
    valid = jnp.asarray(mask_bt) > 0
    (lm,) = _inert(valid, loss_bt.astype(acc))
    m = valid.astype(acc)
    if mode == "token-mean":
        denom = jnp.sum(m) if num_tokens is None else jnp.asarray(num_tokens, acc)
        return (jnp.sum(lm) / jnp.maximum(denom, 1)).astype(loss_bt.dtype)
    tokens_b = jnp.sum(m, axis=-1)
    if mode == "seq-mean-token-mean":
        seq_b = jnp.sum(lm, axis=-1) / jnp.maximum(tokens_b, 1)
    elif mode == "seq-mean-token-sum":
        seq_b = jnp.sum(lm, axis=-1)
    else:  # seq-mean-token-sum-norm
        norm = loss_bt.shape[-1] if max_response_length is None else max_response_length
        seq_b = jnp.sum(lm, axis=-1) / norm
    has_tokens = tokens_b > 0
    denom = jnp.sum(has_tokens, dtype=acc) if num_sequences is None else num_sequences
    loss = jnp.sum(jnp.where(has_tokens, seq_b, 0)) / jnp.maximum(jnp.asarray(denom, acc), 1)
    return loss.astype(loss_bt.dtype)


def _ratio_terms(log_prob, old_log_prob, advantages, cfg: LossConfig):
    neg_kl = jnp.clip(log_prob - old_log_prob, -20.0, 20.0)
    ratio = jnp.exp(neg_kl)
    pg1 = -advantages * ratio  # P
    pg2 = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)  # C
    return neg_kl, ratio, pg1, pg2


def _dual_clip(loss, advantages, cfg: LossConfig):
    """min(-A c, L) on tokens with A < 0; also returns whether that cap bit (pg_clipfrac_lower)."""
    cap = -advantages * cfg.clip_ratio_c
    neg = advantages < 0
    return jnp.where(neg, jnp.minimum(cap, loss), loss), neg & (loss > cap)


def _ppo_metrics(valid, clipped, lower, neg_kl):
    acc = _acc_dtype(neg_kl.dtype)
    return {
        "pg_clipfrac": _masked_mean(clipped, valid, acc),
        "pg_clipfrac_lower": _masked_mean(lower, valid, acc),
        "ppo_kl": _masked_mean(-neg_kl, valid, acc),
    }


_CLIPPED_FLOATS = ("log_prob", "old_log_prob", "advantages")


def _check_clipped(fn, log_prob, old_log_prob, advantages, response_mask, num_tokens, num_seqs):
    per_token = dict(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
    )
    _check_inputs(fn, per_token, _CLIPPED_FLOATS)
    _check_count(fn, "num_tokens", num_tokens)
    _check_count(fn, "num_sequences", num_seqs)


def _clipped(log_prob, old_log_prob, advantages, response_mask, config, num_tokens, num_seqs):
    """dapo_loss's computation on checked inputs."""
    valid = jnp.asarray(response_mask) > 0
    log_prob, old_log_prob, advantages = _inert(valid, log_prob, old_log_prob, advantages)
    neg_kl, _, pg1, pg2 = _ratio_terms(log_prob, old_log_prob, advantages, config)
    loss_bt, lower = _dual_clip(jnp.maximum(pg1, pg2), advantages, config)
    loss = aggregate(
        loss_bt,
        valid,
        config.loss_agg_mode,
        num_tokens,
        num_seqs,
        max_response_length=config.max_response_length,
    )
    return loss, _ppo_metrics(valid, pg2 > pg1, lower, neg_kl)


def dapo_loss(
    log_prob,
    old_log_prob,
    advantages,
    response_mask,
    *,
    config=LossConfig(),
    num_tokens=None,
    num_sequences=None,
):
    """DAPO / PPO clipped loss with clip-higher and dual clip: mean of min(-A c, max(P, C)),
    aggregated by `config.loss_agg_mode` (token-mean: divided by `num_tokens`, by default the
    batch's valid tokens). `[B, T]` inputs as `htpo_loss`'s; raises ValueError on bad inputs."""
    args = (log_prob, old_log_prob, advantages, response_mask)
    _check_clipped("dapo_loss", *args, num_tokens, num_sequences)
    return _clipped(*args, config, num_tokens, num_sequences)


def _dapo_with_agg(mode: str, name: str, doc: str):
    """`dapo_loss` with its aggregation fixed to `mode` (the GRPO-family baselines)."""

    def loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        *,
        config=LossConfig(),
        num_tokens=None,
        num_sequences=None,
    ):
        args = (log_prob, old_log_prob, advantages, response_mask)
        _check_clipped(name, *args, num_tokens, num_sequences)
        cfg = dataclasses.replace(config, loss_agg_mode=mode)
        return _clipped(*args, cfg, num_tokens, num_sequences)

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = doc
    return loss


grpo_loss = _dapo_with_agg(
    "seq-mean-token-mean",
    "grpo_loss",
    "GRPO's aggregation (seq-mean-token-mean) of the clipped loss.",
)
dr_grpo_loss = _dapo_with_agg(
    "seq-mean-token-sum-norm",
    "dr_grpo_loss",
    "Dr. GRPO's aggregation (seq-mean-token-sum-norm) of the clipped loss: the mean over "
    "responses of sum_t(m L) / D, D the constant `config.max_response_length` (the arrays' "
    "width T when it is None, which changes with the padding: set it).",
)


def high_entropy_only_loss(
    log_prob,
    old_log_prob,
    entropy,
    advantages,
    response_mask,
    *,
    config=LossConfig(),
    num_tokens=None,
    num_sequences=None,
):
    """The "80/20" baseline: the clipped loss on the batch's top `high_entropy_ratio` entropy
    tokens only (tau = the k-th largest H over all valid tokens of the batch, k =
    max(floor(rho N), 1)), token-mean over those tokens. `num_tokens`, when given, is the whole
    mini-batch's count of valid tokens (as for every loss); the mean then divides by
    max(floor(rho num_tokens), 1), the number of tokens a selection over the whole mini-batch
    keeps. The selection itself is made per call: per micro-batch under gradient accumulation,
    whose selections hold that many tokens up to one per micro-batch (floors) and ties."""
    fn = "high_entropy_only_loss"
    per_token = dict(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        entropy=entropy,
        advantages=advantages,
        response_mask=response_mask,
    )
    _check_inputs(fn, per_token, (*_CLIPPED_FLOATS, "entropy"))
    _check_count(fn, "num_tokens", num_tokens)
    _check_count(fn, "num_sequences", num_sequences)
    valid = jnp.asarray(response_mask) > 0
    acc = _acc_dtype(_dtype(log_prob))
    (ent,) = _inert(valid, lax.stop_gradient(entropy))
    keys = masked_keys(ent, valid).reshape(1, -1)  # [1, B*T]: one selection over the batch
    n = jnp.sum(valid, dtype=jnp.int32).astype(acc)
    k = jnp.maximum(jnp.floor(config.high_entropy_ratio * n).astype(jnp.int32), 1)
    (tau,) = kth_largest_keys(keys, (k[None],))
    if num_tokens is not None:  # the mini-batch's valid tokens -> the tokens its selection keeps
        n_all = jnp.asarray(num_tokens, acc)
        num_tokens = jnp.maximum(jnp.floor(config.high_entropy_ratio * n_all), 1.0)
    high = (keys >= tau[:, None]).reshape(valid.shape) & valid
    loss, metrics = _clipped(
        log_prob, old_log_prob, advantages, high, config, num_tokens, num_sequences
    )
    metrics["high_entropy_frac"] = _masked_mean(high, valid, acc)
    return loss, metrics


def entropy_split(entropy, valid, hard, correct, config: LossConfig):
    """HTPO's per-row masks: (high, drop) as [B, T] bools.

    high: valid & H >= tau, tau the k-th largest valid H of the row, k = max(floor(rho n), 1)
    (exact bisection, `selection.py`). drop: for hard-correct rows, low & H < v1 with v1 the
    k1-th smallest low H; for easy-correct rows, high & H >= v2 with v2 the k2-th largest high H;
    empty otherwise.

    Low tokens are the bottom n_low of the row and high the top n_high, so v1 is the k1-th
    smallest and v2 the k2-th largest valid H of the whole row: tail order statistics with small
    ranks. They are read off one `lax.top_k` of width K (of -H for hard rows), K the largest rank
    any row can need when tau is not tied (k1, k2 <= 1% of T at the default ratios). A row whose
    rank exceeds K (ties at tau made n_high > k) sends the batch, under `lax.cond`, to the exact
    bisection instead.
    """
    T = entropy.shape[-1]
    k_tab = _count_table(config.high_entropy_ratio, T)
    k1_tab = _count_table(config.drop_low_entropy_ratio, T)
    k2_tab = _count_table(config.drop_high_entropy_ratio, T)
    count = lambda ratio, m: max(int(ratio * m), 1)  # the tables' rule, for static sizes
    k_max = count(config.high_entropy_ratio, T)
    width = min(
        max(
            count(config.drop_low_entropy_ratio, T - k_max),
            count(config.drop_high_entropy_ratio, k_max),
        ),
        T,
    )
    keys = ordered_keys(entropy)  # [B, T]
    n = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [B]
    (tau,) = kth_largest_keys(jnp.where(valid, keys, jnp.zeros_like(keys)), (k_tab[n],))
    high = valid & (keys >= tau[:, None])
    low = valid & ~high
    n_high = jnp.sum(high, axis=-1, dtype=jnp.int32)
    rank = jnp.where(hard, k1_tab[n - n_high], k2_tab[n_high])  # [B], from the bottom / the top
    lowest = jnp.asarray(-jnp.inf, entropy.dtype)
    sign = jnp.where(hard, -1, 1).astype(entropy.dtype)[:, None]

    def by_top_k():
        top = lax.top_k(jnp.where(valid, sign * entropy, lowest), width)[0]  # [B, width]
        v = jnp.take_along_axis(top, jnp.clip(rank - 1, 0, width - 1)[:, None], axis=1)
        return v * sign  # [B, 1]: v1 for hard rows, v2 for easy rows, as entropies

    def by_bisection():
        # the k1-th smallest is the (n - k1 + 1)-th largest
        r = jnp.where(hard, n - rank + 1, rank)
        (v,) = kth_largest_keys(jnp.where(valid, keys, jnp.zeros_like(keys)), (r,))
        return key_values(v, entropy.dtype)[:, None]

    v = lax.cond(jnp.any(correct & (rank > width)), by_bisection, by_top_k)
    drop_low = low & (entropy < v)
    drop_high = high & (entropy >= v)
    drop = jnp.where(hard[:, None], drop_low, drop_high) & correct[:, None]
    return high, drop


def htpo_loss(
    log_prob,
    old_log_prob,
    entropy,
    advantages,
    response_mask,
    hard,
    correct,
    *,
    config=LossConfig(),
    num_tokens=None,
    num_sequences=None,
):
    """HTPO's hierarchical token-level objective (see the module docstring for the 8 groups).

    Args: `[B, T]` log_prob (current policy, differentiated), old_log_prob, entropy (of the
    current policy; stop-gradient is applied here), advantages, response_mask (1 = counts);
    `[B]` bools hard (prompt accuracy < threshold) and correct. `num_tokens`: the mini-batch's
    token count when gradients are accumulated over micro-batches (token-mean).
    Returns (loss scalar, metrics dict of scalars). Raises ValueError on inputs of the wrong
    shape or dtype, or a host count that is not a positive whole number (module docstring).
    """
    fn = "htpo_loss"
    per_token = dict(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        entropy=entropy,
        advantages=advantages,
        response_mask=response_mask,
    )
    _check_inputs(fn, per_token, (*_CLIPPED_FLOATS, "entropy"), dict(hard=hard, correct=correct))
    _check_count(fn, "num_tokens", num_tokens)
    _check_count(fn, "num_sequences", num_sequences)
    cfg = config
    valid = jnp.asarray(response_mask) > 0
    acc = _acc_dtype(_dtype(log_prob))
    hard = jnp.asarray(hard, bool)
    correct = jnp.asarray(correct, bool)
    log_prob, old_log_prob, advantages, entropy = _inert(
        valid, log_prob, old_log_prob, advantages, entropy
    )
    ent = lax.stop_gradient(entropy)
    high, drop = entropy_split(ent, valid, hard, correct, cfg)
    low = valid & ~high

    neg_kl, ratio, pg1, pg2 = _ratio_terms(log_prob, old_log_prob, advantages, cfg)
    clipped_loss = jnp.maximum(pg1, pg2)
    unit = jnp.exp(log_prob - lax.stop_gradient(log_prob))  # I: value 1, gradient 1
    a_unit = advantages * unit
    above = ratio > 1.0 + cfg.clip_ratio_high
    below = ratio < 1.0 - cfg.clip_ratio_low

    hard_b, corr_b = hard[:, None], correct[:, None]
    g2 = high & hard_b & corr_b
    g48 = high & ~corr_b  # G4 and G8: wrong responses, high tokens
    inv_ratio = lax.stop_gradient(jnp.where(g2 & below, jnp.exp(old_log_prob - log_prob), 0))
    g2_loss = jnp.where(
        above, (1.0 + cfg.clip_ratio_high) * a_unit, jnp.where(below, inv_ratio * a_unit, pg1)
    )
    g48_loss = jnp.where(below, (1.0 - cfg.clip_ratio_low) * a_unit, pg1)

    zero = jnp.zeros_like(clipped_loss)
    loss_bt = jnp.where(g2, g2_loss, jnp.where(g48, g48_loss, clipped_loss))
    loss_bt = jnp.where(drop, zero, loss_bt)
    loss_bt, lower = _dual_clip(loss_bt, advantages, cfg)
    loss = aggregate(
        loss_bt,
        valid,
        cfg.loss_agg_mode,
        num_tokens,
        num_sequences,
        max_response_length=cfg.max_response_length,
    )

    g6 = high & ~hard_b & corr_b
    clipped = ((low | g6) & (pg2 > pg1)) | (g2 & (above | below)) | (g48 & below)
    metrics = _ppo_metrics(valid, clipped, lower, neg_kl)
    group_masks = [
        m & h & c for h in (hard_b, ~hard_b) for c in (corr_b, ~corr_b) for m in (low, high)
    ]
    for name, gm in zip(GROUP_NAMES, group_masks, strict=True):
        metrics[f"group_frac/{name}"] = _masked_mean(gm, valid, acc)
    metrics["drop_frac"] = _masked_mean(drop, valid, acc)
    metrics["entropy_high_mean"] = _masked_mean(ent, high, acc)
    metrics["entropy_low_mean"] = _masked_mean(ent, low, acc)
    metrics["entropy_mean"] = _masked_mean(ent, valid, acc)
    return loss, metrics


def nll_loss(log_prob, response_mask, *, config=LossConfig(), num_tokens=None, num_sequences=None):
    """Supervised fine-tuning: the negative log-likelihood of the response tokens, aggregated as
    the clipped losses are (`config.loss_agg_mode`). Not an RL objective (no config name): the
    assets script trains the default model with it through the trainer's update."""
    fn = "nll_loss"
    _check_inputs(fn, dict(log_prob=log_prob, response_mask=response_mask), ("log_prob",))
    _check_count(fn, "num_tokens", num_tokens)
    _check_count(fn, "num_sequences", num_sequences)
    valid = jnp.asarray(response_mask) > 0
    (log_prob,) = _inert(valid, log_prob)
    loss = aggregate(
        -log_prob,
        valid,
        config.loss_agg_mode,
        num_tokens,
        num_sequences,
        max_response_length=config.max_response_length,
    )
    return loss, {}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossInputs:
    """What any loss of `LOSSES` may read, so that every entry has one signature:
    `LOSSES[name](inputs, config=..., num_tokens=..., num_sequences=...)` -> (loss, metrics).
    Each loss reads the fields it needs (entropy: htpo, high_entropy_only; hard / correct: htpo)."""

    log_prob: jax.Array  # [B, T] current policy (differentiated)
    old_log_prob: jax.Array  # [B, T] rollout policy
    advantages: jax.Array  # [B, T]
    response_mask: jax.Array  # [B, T] 1 = counts
    entropy: jax.Array | None = None  # [B, T] current policy's entropy
    hard: jax.Array | None = None  # [B] bool: prompt accuracy < difficulty threshold
    correct: jax.Array | None = None  # [B] bool: the verifier's verdict


def _on_inputs(fn, *fields: str):
    """`fn` called with the named `LossInputs` fields as its positional arguments."""

    def entry(inputs: LossInputs, *, config=LossConfig(), num_tokens=None, num_sequences=None):
        args = (getattr(inputs, f) for f in fields)
        return fn(*args, config=config, num_tokens=num_tokens, num_sequences=num_sequences)

    entry.__name__ = entry.__qualname__ = fn.__name__
    entry.__doc__ = f"`{fn.__name__}({', '.join(fields)})` on a `LossInputs`."
    return entry


_CLIPPED = ("log_prob", "old_log_prob", "advantages", "response_mask")
LOSSES = {
    "htpo": _on_inputs(
        htpo_loss,
        "log_prob",
        "old_log_prob",
        "entropy",
        "advantages",
        "response_mask",
        "hard",
        "correct",
    ),
    "dapo": _on_inputs(dapo_loss, *_CLIPPED),
    "grpo": _on_inputs(grpo_loss, *_CLIPPED),
    "dr_grpo": _on_inputs(dr_grpo_loss, *_CLIPPED),
    "high_entropy_only": _on_inputs(
        high_entropy_only_loss,
        "log_prob",
        "old_log_prob",
        "entropy",
        "advantages",
        "response_mask",
    ),
    "sft": _on_inputs(nll_loss, "log_prob", "response_mask"),
}

__all__ = [
    "LossConfig",
    "LossInputs",
    "htpo_loss",
    "dapo_loss",
    "grpo_loss",
    "dr_grpo_loss",
    "high_entropy_only_loss",
    "nll_loss",
    "entropy_split",
    "aggregate",
    "LOSSES",
    "GROUP_NAMES",
]
