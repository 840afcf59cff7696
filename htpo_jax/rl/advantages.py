"""Group statistics of one RL step: GRPO advantages, prompt difficulty, the dynamic-sampling filter.

All functions take grouped arrays `[P, G]` (P prompts, G responses each) and are pure jnp, so they
run on host numpy arrays or inside jit alike.
"""

from __future__ import annotations

import jax.numpy as jnp


def grpo_advantages(scores, eps: float = 1e-6, norm_by_std: bool = True):
    """A_ij = (s_ij - mean_j s_ij) / (std_j s_ij + eps), one value per response.

    std is Bessel-corrected (torch.std, as verl does). A group of one response has mean 0 and
    std 1 (verl's convention), so its advantage is its score / (1 + eps). With `norm_by_std=False`
    the advantage is s_ij - mean (Dr. GRPO).
    """
    scores = jnp.asarray(scores)
    g = scores.shape[-1]
    if g == 1:
        mean = jnp.zeros_like(scores)
        std = jnp.ones_like(scores)
    else:
        mean = jnp.mean(scores, axis=-1, keepdims=True)
        std = jnp.std(scores, axis=-1, keepdims=True, ddof=1)
    centered = scores - mean
    return centered / (std + eps) if norm_by_std else centered


def hard_prompts(correct, threshold: float = 0.6):
    """[P] bool: a prompt is hard iff its accuracy over its G responses is < threshold (strict)."""
    acc = jnp.mean(jnp.asarray(correct, jnp.float32), axis=-1)
    return acc < threshold


def dynamic_sampling_keep(metric):
    """[P] bool: DAPO's filter keeps a group whose metric (accuracy or score) varies (std > 0),
    or a group of one response; an all-correct or all-wrong group has zero advantage."""
    metric = jnp.asarray(metric, jnp.float32)
    if metric.shape[-1] == 1:
        return jnp.ones(metric.shape[:-1], bool)
    return jnp.any(metric != metric[..., :1], axis=-1)
