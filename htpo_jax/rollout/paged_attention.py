"""The paged KV cache's device side: the page pool layout, writing new keys / values into pages,
and decode attention that reads only each row's pages.

Pool, one entry per layer, in one of two layouts:

    reference (CPU / GPU): (k_pckh, v_pckh), each [num_pages, page_size, K, H]
    tpu:                   (kv_pckh,) [num_pages, page_size, 2K, H], keys at even and values at
                           odd "heads": the layout of jax's TPU kernel
                           `jax.experimental.pallas.ops.tpu.ragged_paged_attention`

(On XLA:CPU, attention over gathered pages of the interleaved layout ran ~5x slower than over
separate k and v pages: the strided k / v slices defeat its fusions.)

Page 0 is the trash page: never handed out by the allocator, it absorbs the writes of empty
slots and padding tokens, so every program writes unconditionally (no masked scatters).

A row's tokens sit at consecutive positions 0, 1, ..., len - 1 (prompt without padding, then the
response): token t is at page `page_table[row, t // page_size]`, offset `t % page_size`.

Decode attention (one query per row):
- `paged_attention_reference`: gathers the row's first `pages_bucket` pages (the caller picks
  the bucket from the longest live row, so the work grows with the rows' real lengths, not with
  max_new_tokens) and masks positions >= kv_len: the plain reference;
- `gather_window` + `window_attention`: the same attention as the engine's CPU / GPU decode
  loop runs it: the pages gathered once per decode call into dense kv-head-major windows, each
  step attending to the window plus the call's recent tokens (not in the pool yet) with two
  batched matmuls;
- `paged_attention_tpu`: the ragged paged attention Pallas kernel that jax ships, which reads
  only the pages below each row's kv_len.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from htpo_jax.models.attention import NEG_INF, attend_one_query


def resolve_impl(impl: str, head_dim: int, platform: str | None = None) -> str:
    """ "auto" -> "tpu" on a TPU (`platform`, default: the default backend) when the kernel takes
    the head size (a multiple of 128: every Qwen3), else "reference"."""
    if impl == "auto":
        platform = platform or jax.default_backend()
        return "tpu" if platform == "tpu" and head_dim % 128 == 0 else "reference"
    if impl not in ("tpu", "reference"):
        raise ValueError(f"paged attention: impl must be auto, tpu or reference, got {impl!r}")
    return impl


def init_pool(num_layers, num_pages, page_size, kv_heads, head_dim, dtype, impl="reference"):
    """Zeroed pools (page 0 = trash) in `impl`'s layout, every layer stacked: a tuple of arrays
    [L, num_pages, page_size, ...] (the decoder's kv_state convention: leading layer axis)."""
    if impl == "tpu":
        return (jnp.zeros((num_layers, num_pages, page_size, 2 * kv_heads, head_dim), dtype),)
    shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
    return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def page_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int, itemsize: int):
    """Bytes of one page over all layers (k and v)."""
    return num_layers * page_size * 2 * kv_heads * head_dim * itemsize


def interleave_kv(k_xkh, v_xkh):
    """[..., K, H] keys and values -> [..., 2K, H], k at even and v at odd heads."""
    kv = jnp.stack([k_xkh, v_xkh], axis=-2)  # [..., K, 2, H]
    return kv.reshape(*k_xkh.shape[:-2], 2 * k_xkh.shape[-2], k_xkh.shape[-1])  # [..., 2K, H]


def write_kv(pool, layer, k_xkh, v_xkh, page_x, offset_x):
    """Writes X tokens' keys and values ([X, K, H] each) of `layer` at (page_x, offset_x).

    `layer` is an int (may be traced) or an int array broadcasting against page_x. Tokens aimed
    at page 0 (trash) may collide; real pages never do (one writer per slot).
    """
    idx = (layer, page_x, offset_x)
    if len(pool) == 1:
        (kv,) = pool
        new = interleave_kv(k_xkh, v_xkh).astype(kv.dtype)  # [X, 2K, H]
        return (kv.at[idx].set(new, mode="promise_in_bounds"),)
    k, v = pool
    return (
        k.at[idx].set(k_xkh.astype(k.dtype), mode="promise_in_bounds"),
        v.at[idx].set(v_xkh.astype(v.dtype), mode="promise_in_bounds"),
    )


def copy_pages(pool, src_x, dst_x):
    """Page dst_x[i] <- page src_x[i] in every layer (copy-on-write; 0 -> 0 is a no-op)."""
    return tuple(a.at[:, dst_x].set(a[:, src_x]) for a in pool)


def gather_pages(a_lpckh, layer, page_table_bp):
    """`layer`'s pages of each row as one dense sequence [B, P * page_size, K, H]."""
    b, p = page_table_bp.shape
    c, k, h = a_lpckh.shape[2:]
    x = a_lpckh.at[layer, page_table_bp].get(mode="promise_in_bounds")  # [B, P, C, K, H]
    return x.reshape(b, p * c, k, h)


def paged_attention_reference(q_bnh, pool, layer, page_table_bp, kv_len_b):
    """Decode attention of one query per row over that row's first kv_len_b tokens.

    q_bnh [B, N, H]; pool = (k, v) pages of all layers; page_table_bp [B, P]: the row's pages
    (P = the caller's pages bucket, at least ceil(max kv_len / page_size); unused entries may be
    any page); kv_len_b [B] >= 1. Returns [B, N, H].
    """
    k_bskh, v_bskh = (gather_pages(a, layer, page_table_bp).astype(q_bnh.dtype) for a in pool)
    mask_b1s = (jnp.arange(k_bskh.shape[1])[None, :] < kv_len_b[:, None])[:, None, :]
    return attend_one_query(q_bnh[:, None], k_bskh, v_bskh, mask_b1s)[:, 0]  # [B, N, H]


def gather_window(pool, layer: int, page_table_sp):
    """`layer`'s pages of each row as dense windows: keys [S, K, H, T] and values [S, K, T, H]
    (T = P * page_size), so that a decode step's attention is two plain batched matmuls over
    (row, kv head) (XLA:CPU ran q @ k^T over [S, K, T, H] keys at ~1/3 of the speed of q @ k
    over [S, K, H, T]). Reference layout only; the engine gathers them once per decode call."""
    k, v = (a.at[layer, page_table_sp].get(mode="promise_in_bounds") for a in pool)
    s, p, c, kh, h = k.shape  # [S, P, C, K, H]
    return (
        k.transpose(0, 3, 4, 1, 2).reshape(s, kh, h, p * c),
        v.transpose(0, 3, 1, 2, 4).reshape(s, kh, p * c, h),
    )


def window_attention(q_snh, window, len_s, recent, recent_r):
    """Decode attention of one query per row over the row's first len_s window tokens followed
    by R recent ones.

    q_snh [S, N, H]; window = (keys [S, K, H, T], values [S, K, T, H]) (one layer of
    `gather_window`); recent = (keys [S, K, H, R], values [S, K, R, H]), positions with
    recent_r [R] True are real. Scores and the softmax in float32 (one softmax over both parts).
    Returns [S, N, H] in the values' dtype.
    """
    s, n, h = q_snh.shape
    kh = window[0].shape[1]
    q = q_snh.reshape(s, kh, n // kh, h).astype(window[0].dtype)  # query head n = k * G + g
    f32 = jnp.float32

    def scores(keys, valid):  # [S, K, G, T]
        x = jnp.einsum("skgh,skht->skgt", q, keys.astype(q.dtype), preferred_element_type=f32)
        return jnp.where(valid, x * (h**-0.5), NEG_INF)

    t = window[0].shape[3]
    s_w = scores(window[0], (jnp.arange(t)[None, :] < len_s[:, None])[:, None, None, :])
    s_r = scores(recent[0], recent_r[None, None, None, :])
    top = jnp.maximum(s_w.max(-1, keepdims=True), s_r.max(-1, keepdims=True))
    p_w, p_r = jnp.exp(s_w - top), jnp.exp(s_r - top)
    den = p_w.sum(-1) + p_r.sum(-1)  # [S, K, G]

    def mix(p, values):  # [S, K, G, H]
        v = values.astype(window[1].dtype)
        return jnp.einsum("skgt,skth->skgh", p.astype(v.dtype), v, preferred_element_type=f32)

    out = (mix(p_w, window[1]) + mix(p_r, recent[1])) / den[..., None]
    return out.astype(window[1].dtype).reshape(s, n, h)


def paged_attention_tpu(q_bnh, pool, layer, page_table_bp, kv_len_b):
    """`paged_attention_reference` with jax's ragged paged attention kernel (TPU layout)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    kv = jax.lax.dynamic_index_in_dim(pool[0], layer, 0, keepdims=False)  # [P, C, 2K, H]
    b, _, h = q_bnh.shape
    cu_q_lens = jnp.arange(b + 1, dtype=jnp.int32)  # one query per row
    # Block sizes chosen here, not by the kernel's tuned table: the table keys on the local
    # device (no TPU when compile_check compiles from a CPU host), and its fallback of 128 pages
    # a block (2,048 tokens at page_size 16) overflowed the TPU compiler's scoped VMEM for
    # Qwen3-4B/8B's 8 kv heads. ~512 tokens of keys and values a block fits; the AOT check and
    # a real TPU then compile the same kernel.
    blocks = dict(
        num_kv_pages_per_block=min(page_table_bp.shape[1], max(1, 512 // kv.shape[1])),
        num_queries_per_block=min(b, 32),
    )
    return ragged_paged_attention(
        q_bnh.astype(kv.dtype),
        kv,
        kv_len_b.astype(jnp.int32),
        page_table_bp.astype(jnp.int32),
        cu_q_lens,
        jnp.array([b], jnp.int32),
        sm_scale=h**-0.5,
        **blocks,
    ).astype(q_bnh.dtype)
