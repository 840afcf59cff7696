"""Verifiable rewards: DAPO math reward, math-verify option, batch scoring, overlong penalty."""

from htpo_jax.rewards.dapo_math import dapo_math_score, normalize_final_answer
from htpo_jax.rewards.mathverify import math_verify_score
from htpo_jax.rewards.scoring import (
    REWARD_FNS,
    RewardBatch,
    RewardPool,
    RewardPools,
    compute_rewards,
    overlong_penalty,
    resolve_fn,
    score_batch,
)

__all__ = [
    "REWARD_FNS",
    "RewardBatch",
    "RewardPool",
    "RewardPools",
    "compute_rewards",
    "dapo_math_score",
    "math_verify_score",
    "normalize_final_answer",
    "overlong_penalty",
    "resolve_fn",
    "score_batch",
]
