"""Off-policy correction of asynchronous rollouts (`algorithm.rollout_is`), on host arrays.

Three policies meet in an asynchronous step: the behaviour policy mu that sampled a token (its
log-prob recorded at sampling time, `Rollout.log_probs`), the proximal policy pi_old (the
trainer's parameters when stage 6 scores the batch: the `old_log_prob` of the PPO ratio, as in a
synchronous step) and the current policy pi_theta (differentiated). The PPO/HTPO ratio
pi_theta / pi_old stays as it is; the token's loss is multiplied by a truncated importance weight

    rho_t = pi_old(y_t) / mu(y_t) = exp(old_log_prob_t - behaviour_log_prob_t)
    tis:  w_t = min(rho_t, C)                          (truncated IS, token level)
    mis:  w_t = rho_t if 1/C <= rho_t <= C, else 0      (masked IS, token level)

with C = `algorithm.rollout_is_cap`: verl's rollout correction (`rollout_is` token mode: the
truncation of Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training"; the mask of "When Speed Kills Stability", 2025) and tunix's `sampler_is` weight
between the sampler's and the trainer's log-probs. Tokens sampled by the proximal policy itself
(policy version == the trainer's current version) get w_t = 1 exactly: there the two log-probs
differ only by the sampler's numerics, and a synchronous step is left bit for bit as it was.

Every loss of `rl.loss.LOSSES` is positively homogeneous in the advantage token by token (its
clipped terms are -A r and -A clip(r); the dual clip's cap is -A c; HTPO's group terms are A
times a ratio-only factor; dropped tokens are 0): scaling A_t by w_t >= 0 multiplies the token's
loss by w_t and changes none of the clip decisions. So the weight is applied to the advantages
(`apply`), and the losses themselves are unchanged.
"""

from __future__ import annotations

import numpy as np

STALENESS_BINS = 4  # staleness/0 .. staleness/3, and staleness/4+ for the rest


def is_weights(old_log_prob, behaviour_log_prob, staleness, mask, mode: str, cap: float):
    """Per-token weights w [N, R] (float32) and the IS metrics; `staleness` [N, R] is the
    current policy version minus the version that sampled each token (0: sampled by the proximal
    policy: w = 1), `mask` [N, R] the response tokens that count."""
    m = np.asarray(mask) > 0
    stale = m & (np.asarray(staleness) > 0)
    rho = np.exp(np.asarray(old_log_prob, np.float64) - np.asarray(behaviour_log_prob, np.float64))
    if mode == "tis":
        w = np.minimum(rho, cap)
        clipped = rho > cap
    elif mode == "mis":
        inside = (rho >= 1.0 / cap) & (rho <= cap)
        w, clipped = np.where(inside, rho, 0.0), ~inside
    elif mode == "off":
        w, clipped = np.ones_like(rho), np.zeros(rho.shape, bool)
    else:
        raise ValueError(f"is_weights: mode must be off, tis or mis, got {mode!r}")
    w = np.where(stale, w, 1.0).astype(np.float32)
    n = max(int(m.sum()), 1)
    metrics = {
        "offpolicy/is_weight_mean": float(w[m].mean()) if m.any() else 1.0,
        "offpolicy/is_weight_max": float(w[m].max()) if m.any() else 1.0,
        "offpolicy/is_clipped_frac": float((clipped & stale).sum() / n),
        "offpolicy/stale_token_frac": float(stale.sum() / n),
        "offpolicy/rho_max": float(rho[stale].max()) if stale.any() else 1.0,
    }
    return w, metrics


def staleness_histogram(staleness_rows) -> dict:
    """Share of response rows by staleness (the row's oldest token): `staleness/0` ..
    `staleness/3`, `staleness/4+`, and the mean."""
    s = np.asarray(staleness_rows)
    out = {f"staleness/{k}": float(np.mean(s == k)) for k in range(STALENESS_BINS)}
    out[f"staleness/{STALENESS_BINS}+"] = float(np.mean(s >= STALENESS_BINS))
    out["staleness/mean"] = float(s.mean())
    return out


def apply(advantages, weights):
    """The advantages [N, R] with every token's IS weight folded in (see the module docstring)."""
    return (np.asarray(advantages) * weights).astype(np.float32)
