"""Token-level policy losses: HTPO (the paper's objective) and the baselines it is compared with.

All functions take `[B, T]` arrays (B responses, T token slots), are jittable with static shapes,
have no Python loop over rows and no host sync, keep the input float dtype, and work with the
batch axis sharded. The rules are those of the official implementation (see docs/LOSS.md):

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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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
    """Hyper-parameters of the clipped objectives; defaults are the paper's."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    high_entropy_ratio: float = 0.2
    drop_low_entropy_ratio: float = 0.006
    drop_high_entropy_ratio: float = 0.02
    loss_agg_mode: str = "token-mean"

    def __post_init__(self):
        for name, (ok, want) in LOSS_BOUNDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not ok(v):
                raise ValueError(f"LossConfig.{name} {want}, got {v!r}")
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(
                f"LossConfig.loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}"
            )


def _count_table(ratio: float, size: int) -> jax.Array:
    """max(floor(ratio n), 1) for n = 0..size, with the float64 product truncated as Python does."""
    return jnp.asarray([max(int(ratio * n), 1) for n in range(size + 1)], jnp.int32)


def _masked_mean(x, mask, denom=None):
    denom = jnp.sum(mask) if denom is None else denom
    return jnp.sum(jnp.where(mask, x, 0)) / jnp.maximum(denom, 1)


def aggregate(loss_bt, mask_bt, mode="token-mean", num_tokens=None, num_sequences=None):
    """verl's `agg_loss`. `num_tokens` / `num_sequences` are the whole mini-batch's counts when a
    caller accumulates gradients over micro-batches; by default this batch's counts are used."""
    m = mask_bt.astype(loss_bt.dtype)
    lm = jnp.where(mask_bt, loss_bt, 0)
    if mode == "token-mean":
        denom = jnp.sum(m) if num_tokens is None else jnp.asarray(num_tokens, loss_bt.dtype)
        return jnp.sum(lm) / jnp.maximum(denom, 1)
    tokens_b = jnp.sum(m, axis=-1)
    if mode == "seq-mean-token-mean":
        seq_b = jnp.sum(lm, axis=-1) / jnp.maximum(tokens_b, 1)
    elif mode == "seq-mean-token-sum":
        seq_b = jnp.sum(lm, axis=-1)
    elif mode == "seq-mean-token-sum-norm":
        seq_b = jnp.sum(lm, axis=-1) / loss_bt.shape[-1]
    else:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    has_tokens = tokens_b > 0
    denom = jnp.sum(has_tokens) if num_sequences is None else num_sequences
    return jnp.sum(jnp.where(has_tokens, seq_b, 0)) / jnp.maximum(
        jnp.asarray(denom, seq_b.dtype), 1
    )


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
    return {
        "pg_clipfrac": _masked_mean(clipped, valid),
        "pg_clipfrac_lower": _masked_mean(lower, valid),
        "ppo_kl": _masked_mean(-neg_kl, valid),
    }


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
    """DAPO / PPO clipped loss with clip-higher and dual clip: mean of min(-A c, max(P, C))."""
    valid = response_mask > 0
    neg_kl, _, pg1, pg2 = _ratio_terms(log_prob, old_log_prob, advantages, config)
    loss_bt, lower = _dual_clip(jnp.maximum(pg1, pg2), advantages, config)
    loss = aggregate(loss_bt, valid, config.loss_agg_mode, num_tokens, num_sequences)
    return loss, _ppo_metrics(valid, pg2 > pg1, lower, neg_kl)


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
        cfg = dataclasses.replace(config, loss_agg_mode=mode)
        return dapo_loss(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            config=cfg,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )

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
    "Dr. GRPO's aggregation (seq-mean-token-sum-norm: token sums over the constant T).",
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
    valid = response_mask > 0
    ent = lax.stop_gradient(entropy)
    keys = masked_keys(ent, valid).reshape(1, -1)  # [1, B*T]: one selection over the batch
    n = jnp.sum(valid, dtype=jnp.int32).astype(log_prob.dtype)
    k = jnp.maximum(jnp.floor(config.high_entropy_ratio * n).astype(jnp.int32), 1)
    (tau,) = kth_largest_keys(keys, (k[None],))
    if num_tokens is not None:  # the mini-batch's valid tokens -> the tokens its selection keeps
        n_all = jnp.asarray(num_tokens, jnp.float32)
        num_tokens = jnp.maximum(jnp.floor(config.high_entropy_ratio * n_all), 1.0)
    high = (keys >= tau[:, None]).reshape(valid.shape) & valid
    loss, metrics = dapo_loss(
        log_prob,
        old_log_prob,
        advantages,
        high.astype(response_mask.dtype),
        config=config,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
    )
    metrics["high_entropy_frac"] = _masked_mean(high, valid)
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
    Returns (loss scalar, metrics dict of scalars).
    """
    cfg = config
    valid = response_mask > 0
    hard = jnp.asarray(hard, bool)
    correct = jnp.asarray(correct, bool)
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
    loss = aggregate(loss_bt, valid, cfg.loss_agg_mode, num_tokens, num_sequences)

    g6 = high & ~hard_b & corr_b
    clipped = ((low | g6) & (pg2 > pg1)) | (g2 & (above | below)) | (g48 & below)
    metrics = _ppo_metrics(valid, clipped, lower, neg_kl)
    group_masks = [
        m & h & c for h in (hard_b, ~hard_b) for c in (corr_b, ~corr_b) for m in (low, high)
    ]
    for name, gm in zip(GROUP_NAMES, group_masks, strict=True):
        metrics[f"group_frac/{name}"] = _masked_mean(gm, valid)
    metrics["drop_frac"] = _masked_mean(drop, valid)
    metrics["entropy_high_mean"] = _masked_mean(ent, high)
    metrics["entropy_low_mean"] = _masked_mean(ent, low)
    metrics["entropy_mean"] = _masked_mean(ent, valid)
    return loss, metrics


def nll_loss(log_prob, response_mask, *, config=LossConfig(), num_tokens=None, num_sequences=None):
    """Supervised fine-tuning: the negative log-likelihood of the response tokens, aggregated as
    the clipped losses are (`config.loss_agg_mode`). Not an RL objective (no config name): the
    assets script trains the default model with it through the trainer's update."""
    valid = response_mask > 0
    loss = aggregate(-log_prob, valid, config.loss_agg_mode, num_tokens, num_sequences)
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
