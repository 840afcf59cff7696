"""Which reward scores which row: routing by the row's `data_source`, as verl's
`default_compute_score` does (the DAPO reward manager calls it for every response).

`algorithm.reward_routing: data_source` (the default) picks the verifier from the row's
`data_source`; a source with no known verifier is an error (`UnknownDataSource`), raised before
any sampling. `algorithm.reward_routing: reward_fn` forces `algorithm.reward_fn` for every row
(for data whose `data_source` names nothing we know, e.g. a plain JSONL file, whose rows take
the file name as their source).

The table follows verl 0.7 for the sources it can score here: `math_dapo`, `math`,
`math_dapo_reasoning` and every `aime*` source get the DAPO math reward (`dapo_math`); the MATH
sets (`lighteval/MATH`, `DigitalLearningGmbH/MATH-lighteval`, `HuggingFaceH4/MATH-500`) get the
math-verify reward (verl's own MATH scorer is a different string matcher; see docs/TRAINING.md).
`arith`, the embedded task of `assets/arith`, ends in `Answer: N` like DAPO data: `dapo_math`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from htpo_jax.rewards.scoring import RewardBatch, compute_rewards

DAPO_MATH_SOURCES = frozenset({"math_dapo", "math", "math_dapo_reasoning", "arith"})
MATH_VERIFY_SOURCES = frozenset(
    {"lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500"}
)


class UnknownDataSource(ValueError):
    """A row's data_source has no verifier (one line, names the source and the way out)."""


def reward_for_source(data_source: str) -> str | None:
    """The reward name (`dapo_math`, `math_verify`) verl would use for a source, or None."""
    if data_source in DAPO_MATH_SOURCES or data_source.startswith("aime"):
        return "dapo_math"
    if data_source in MATH_VERIFY_SOURCES:
        return "math_verify"
    return None


def reward_names(data_sources: Sequence[str], cfg) -> list[str]:
    """The reward of each row under `cfg.algorithm.reward_routing`; raises UnknownDataSource."""
    a = cfg.algorithm
    if getattr(a, "reward_routing", "data_source") == "reward_fn":
        return [a.reward_fn] * len(data_sources)
    names = []
    for source in data_sources:
        name = reward_for_source(source)
        if name is None:
            raise UnknownDataSource(
                f"no reward for data_source '{source}' (known: "
                f"{', '.join(sorted(DAPO_MATH_SOURCES | MATH_VERIFY_SOURCES))}, aime*); "
                f"set algorithm.reward_routing=reward_fn to score every row with "
                f"algorithm.reward_fn ({a.reward_fn})"
            )
        names.append(name)
    return names


def check_sources(data_sources, cfg, where: str = "") -> None:
    """Fail before any work when a dataset holds a source we cannot score."""
    try:
        reward_names(sorted(set(data_sources)), cfg)
    except UnknownDataSource as e:
        raise UnknownDataSource(f"{where}: {e}" if where else str(e)) from None


def routed_rewards(
    solutions: Sequence[str],
    ground_truths: Sequence[str],
    data_sources: Sequence[str],
    response_lengths,
    cfg,
    pools=None,
) -> tuple[np.ndarray, RewardBatch]:
    """`compute_rewards` with each row scored by the reward its data_source routes to.

    Rows are grouped by reward and each group is scored in one call (worker processes, when
    used, come from `pools`: one pool per verifier, owned by the caller).
    Returns (reward [N], RewardBatch) in input order, as `compute_rewards` does.
    """
    names = np.asarray(reward_names(data_sources, cfg), dtype=object)
    lengths = np.asarray(response_lengths)
    groups = sorted(set(names.tolist()))
    if len(groups) == 1:
        return compute_rewards(solutions, ground_truths, lengths, cfg, pools=pools, fn=groups[0])
    n = len(solutions)
    reward = np.zeros(n, np.float32)
    parts: list[tuple[np.ndarray, RewardBatch]] = []
    for name in groups:
        idx = np.flatnonzero(names == name)
        r, b = compute_rewards(
            [solutions[i] for i in idx],
            [ground_truths[i] for i in idx],
            lengths[idx],
            cfg,
            pools=pools,
            fn=name,
        )
        reward[idx] = r
        parts.append((idx, b))
    return reward, _scatter(parts, n)


def _scatter(parts: list[tuple[np.ndarray, RewardBatch]], n: int) -> RewardBatch:
    """RewardBatches of disjoint row subsets -> one batch in input order (every field)."""
    fields = {}
    for f in dataclasses.fields(RewardBatch):
        first = getattr(parts[0][1], f.name)
        if isinstance(first, np.ndarray):
            out = np.zeros((n, *first.shape[1:]), first.dtype)
            for idx, b in parts:
                out[idx] = getattr(b, f.name)
        else:
            out = [None] * n
            for idx, b in parts:
                for i, v in zip(idx, getattr(b, f.name), strict=True):
                    out[i] = v
        fields[f.name] = out
    return RewardBatch(**fields)
