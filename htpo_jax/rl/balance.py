"""`data.balance_batch`: reorder a step's rows so that every data-parallel shard gets about the
same number of tokens (verl's `RayPPOTrainer._balance_batch`, on by default there).

verl measures each row's length as the sum of its attention mask (prompt + response), splits the
rows into `dp` equal-size partitions with balanced token sums (Karmarkar-Karp) and concatenates
the partitions, so that rank r receives partition r; each rank then cuts its rows into PPO
mini-batches and micro-batches in order. Here one jitted update sees a whole mini-batch with its
batch axis split over the `data x fsdp` devices, each micro-batch `[micro]` cut into contiguous
`micro / dp` slices, so `mesh_order` lays partition r out at exactly those slices: shard r gets
the same rows, in the same order, that verl's rank r gets.

The partitioner is greedy (longest row first into the lightest partition that still has room),
not Karmarkar-Karp: both give equal-size partitions whose token sums differ by at most one row's
length; the exact partitions can differ. With one shard (dp = 1) the order is unchanged, as in
verl.
"""

from __future__ import annotations

import heapq

import jax
import numpy as np


def balanced_partitions(seqlen: np.ndarray, k: int) -> list[np.ndarray]:
    """k equal-size groups of row indices with balanced sums of `seqlen` [N] (N % k == 0), each
    sorted by index. Greedy: rows by decreasing length, each into the lightest open group."""
    seqlen = np.asarray(seqlen)
    n = seqlen.shape[0]
    if k < 1 or n % k:
        raise ValueError(f"cannot split {n} rows into {k} equal partitions")
    cap = n // k
    heap = [(0, p) for p in range(k)]  # (token sum, partition); full partitions leave the heap
    parts: list[list[int]] = [[] for _ in range(k)]
    for i in np.argsort(-seqlen, kind="stable"):
        total, p = heapq.heappop(heap)
        parts[p].append(int(i))
        if len(parts[p]) < cap:
            heapq.heappush(heap, (total + int(seqlen[i]), p))
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def shards_used(n_rows: int, n_shards: int, micro_rows: int) -> int:
    """Shards a micro-batch is split over: 1 when `micro_rows` (or the row count) is not a
    multiple of `n_shards` (such a micro-batch is replicated, not split)."""
    ok = n_shards > 1 and micro_rows % n_shards == 0 and n_rows % n_shards == 0
    return n_shards if ok else 1


def mesh_order(seqlen: np.ndarray, n_shards: int, mini_rows: int, micro_rows: int) -> np.ndarray:
    """Row permutation [N] for `train.update_all`'s layout: in mini-batch m, micro-batch j, shard
    r holds rows `(m * mini_rows + j * micro_rows) / dp + [0, micro_rows / dp)` of partition r."""
    n = len(seqlen)
    dp = shards_used(n, n_shards, micro_rows)
    parts = np.stack(balanced_partitions(seqlen, dp))  # [dp, N / dp]
    if dp == 1:
        return parts[0]
    n_mini, n_micro = n // mini_rows, mini_rows // micro_rows
    # [dp, N/dp] -> [dp, n_mini, n_micro, micro/dp] -> [n_mini, n_micro, dp, micro/dp]
    parts = parts.reshape(dp, n_mini, n_micro, micro_rows // dp).transpose(1, 2, 0, 3)
    return parts.reshape(-1)


def shard_tokens(seqlen: np.ndarray, order: np.ndarray, n_shards: int, micro_rows: int):
    """Tokens each shard receives when the rows are laid out in `order` [N] (a shard takes the
    r-th `micro_rows / dp` slice of every micro-batch). Returns [dp] sums."""
    seqlen = np.asarray(seqlen, np.int64)
    dp = shards_used(len(seqlen), n_shards, micro_rows)
    shard_of_pos = (np.arange(len(order)) // (micro_rows // dp)) % dp
    return np.bincount(shard_of_pos, weights=seqlen[np.asarray(order)], minlength=dp)


def balance_stats(seqlen, order, n_shards: int, micro_rows: int) -> dict[str, float]:
    """verl's `global_seqlen/*` metrics: tokens per shard in kept order and after balancing."""
    before = shard_tokens(seqlen, np.arange(len(seqlen)), n_shards, micro_rows)
    after = shard_tokens(seqlen, order, n_shards, micro_rows)
    return {
        "global_seqlen/min": float(before.min()),
        "global_seqlen/max": float(before.max()),
        "global_seqlen/minmax_diff": float(before.max() - before.min()),
        "global_seqlen/balanced_min": float(after.min()),
        "global_seqlen/balanced_max": float(after.max()),
        "global_seqlen/mean": float(before.mean()),
    }


def balance_batch(batch, n_shards: int, cfg):
    """A step's `UpdateBatch` with its rows in `mesh_order`, and the `global_seqlen/*` metrics."""
    seqlen = np.asarray(batch.attention_mask).sum(-1)  # [N] prompt + response, as verl counts
    mini_rows, micro_rows = cfg.optim.mini_batch_size * cfg.rollout.n, cfg.optim.micro_batch_size
    order = mesh_order(seqlen, n_shards, mini_rows, micro_rows)
    stats = balance_stats(seqlen, order, n_shards, micro_rows)
    return jax.tree.map(lambda x: x[order], batch), stats
