"""Grouped-query softmax attention implementations used by `models/decoder.py`.

Shape letters as in decoder.py: B batch, T query positions, S key positions, N query heads, K kv
heads, G = N // K, H head dim. Every function takes queries [B, T, N, H], keys and values
[B, S, K, H] and a boolean mask [B, T, S] (True = may attend), and returns [B, T, N, H] in the
values' dtype; scores and softmax are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = float(np.finfo(np.float32).min)  # finite: fully masked rows give no NaN


def attend(q_btnh, k_bskh, v_bskh, mask_bts):
    """Grouped-query softmax attention; float32 scores and softmax."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    if t == 1:
        return attend_one_query(q_btnh, k_bskh, v_bskh, mask_bts)
    q = q_btnh.reshape(b, t, k, n // k, h)  # [B, T, K, G, H]: query head n = kv head k * G + g
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bts[:, None, None], scores * (h**-0.5), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)  # [B, T, N, H]


def attend_one_query(q_b1nh, k_bskh, v_bskh, mask_b1s):
    """`attend` for a single query position (a decode step), as multiply-and-reduce.

    The einsums of `attend` batch over (b, k), which the [B, S, K, H] cache holds apart, so XLA
    (at least on CPU) copies the whole cache to [B, K, S, H] for every call: a full-cache copy
    per layer per decode step. Products reduced over H (scores) and over S (values) read the
    cache in place instead (rollout decode step on CPU: ~14% less time).
    """
    b, _, n, h = q_b1nh.shape
    k = k_bskh.shape[2]
    q_bkgh = q_b1nh.reshape(b, k, n // k, h).astype(jnp.float32)  # query head n = k * G + g
    k_bskgh = k_bskh[:, :, :, None, :].astype(jnp.float32)
    scores_bskg = jnp.sum(q_bkgh[:, None] * k_bskgh, axis=-1) * (h**-0.5)
    scores_bskg = jnp.where(mask_b1s[:, 0, :, None, None], scores_bskg, NEG_INF)
    probs_bskg = jax.nn.softmax(scores_bskg, axis=1)
    v_bskgh = v_bskh[:, :, :, None, :].astype(jnp.float32)
    out_bkgh = jnp.sum(probs_bskg[..., None] * v_bskgh, axis=1)
    return out_bkgh.astype(v_bskh.dtype).reshape(b, 1, n, h)  # [B, T=1, N, H]


def attend_in_query_chunks(q_btnh, k_bskh, v_bskh, mask_bts, chunk_size):
    """`attend`, one block of `chunk_size` queries at a time (lax.map + checkpoint).

    Peak memory holds [B, N, chunk_size, S] scores instead of [B, N, T, S], in the forward and
    (each block's scores are recomputed) in the backward pass.
    """
    b, t, n, h = q_btnh.shape
    s = k_bskh.shape[1]
    if chunk_size is None or t <= chunk_size:
        return attend(q_btnh, k_bskh, v_bskh, mask_bts)
    nc = -(-t // chunk_size)
    pad = nc * chunk_size - t
    q = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.reshape(b, nc, chunk_size, n, h).swapaxes(0, 1)  # [nc, B, C, N, H]
    m = jnp.pad(mask_bts, ((0, 0), (0, pad), (0, 0)))
    m = m.reshape(b, nc, chunk_size, s).swapaxes(0, 1)  # [nc, B, C, S]
    block = jax.checkpoint(lambda qm: attend(qm[0], k_bskh, v_bskh, qm[1]))
    out = jax.lax.map(block, (q, m))  # [nc, B, C, N, H]
    return out.swapaxes(0, 1).reshape(b, nc * chunk_size, n, h)[:, :t]  # [B, T, N, H]
