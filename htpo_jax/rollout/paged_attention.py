"""The paged KV cache's device side: the page pool layout, writing new keys / values into pages,
and decode attention that reads only each row's pages.

Pool layout (one array per layer), the layout of jax's TPU kernel
`jax.experimental.pallas.ops.tpu.ragged_paged_attention`:

    pool_pckh  [num_pages, page_size, 2K, H]   keys at even "heads" 0, 2, ..., values at odd ones

Page 0 is the trash page: never handed out by the allocator, it absorbs the writes of empty
slots and padding tokens, so every program writes unconditionally (no masked scatters).

A row's tokens sit at consecutive positions 0, 1, ..., len - 1 (prompt without padding, then the
response): token t is at page `page_table[row, t // page_size]`, offset `t % page_size`.

Decode attention (one query per row, after the new token's k/v were written):
- `paged_attention_reference` (CPU / GPU): gathers the row's first `pages_bucket` pages (the
  caller picks the bucket from the longest live row, so the work grows with the rows' real
  lengths, not with max_new_tokens) and masks positions >= kv_len;
- `paged_attention_tpu`: the ragged paged attention Pallas kernel that jax ships, which reads only
  the pages below each row's kv_len;
- `paged_decode_attention` picks the kernel on TPU and the reference elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from htpo_jax.models.decoder import attend_one_query


def init_pool(num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype):
    """Zeroed pools, one [num_pages, page_size, 2K, H] array per layer (page 0 = trash)."""
    shape = (num_pages, page_size, 2 * kv_heads, head_dim)
    return tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))


def page_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int, itemsize: int):
    """Bytes of one page over all layers (k and v)."""
    return num_layers * page_size * 2 * kv_heads * head_dim * itemsize


def interleave_kv(k_xkh, v_xkh):
    """[..., K, H] keys and values -> [..., 2K, H], k at even and v at odd heads."""
    kv = jnp.stack([k_xkh, v_xkh], axis=-2)  # [..., K, 2, H]
    return kv.reshape(*k_xkh.shape[:-2], 2 * k_xkh.shape[-2], k_xkh.shape[-1])  # [..., 2K, H]


def write_kv(pool_pckh, k_xkh, v_xkh, page_x, offset_x):
    """Writes X tokens' keys and values ([X, K, H] each) at (page_x, offset_x) ([X] int32).

    Tokens aimed at page 0 (trash) may collide; real pages never do (one writer per slot).
    """
    kv = interleave_kv(k_xkh, v_xkh).astype(pool_pckh.dtype)  # [X, 2K, H]
    return pool_pckh.at[page_x, offset_x].set(kv, mode="promise_in_bounds")


def gather_rows(pool_pckh, page_table_bp):
    """Each row's pages as a dense sequence: (k, v) each [B, P * page_size, K, H]."""
    b, p = page_table_bp.shape
    _, c, k2, h = pool_pckh.shape
    kv = pool_pckh.at[page_table_bp].get(mode="promise_in_bounds")  # [B, P, C, 2K, H]
    kv = kv.reshape(b, p * c, k2 // 2, 2, h)  # [B, S = P * C, K, 2, H]
    return kv[:, :, :, 0], kv[:, :, :, 1]


def paged_attention_reference(q_bnh, pool_pckh, page_table_bp, kv_len_b):
    """Decode attention of one query per row over that row's first kv_len_b tokens.

    q_bnh [B, N, H]; page_table_bp [B, P]: the row's pages (P = the caller's pages bucket, at
    least ceil(max kv_len / page_size); unused entries may be anything in range); kv_len_b [B]
    >= 1 including the token whose k/v were just written. Returns [B, N, H].
    """
    k_bskh, v_bskh = gather_rows(pool_pckh, page_table_bp)
    s = k_bskh.shape[1]
    mask_b1s = (jnp.arange(s)[None, :] < kv_len_b[:, None])[:, None, :]  # [B, 1, S]
    out = attend_one_query(
        q_bnh[:, None], k_bskh.astype(q_bnh.dtype), v_bskh.astype(q_bnh.dtype), mask_b1s
    )
    return out[:, 0]  # [B, N, H]


def paged_attention_tpu(q_bnh, pool_pckh, page_table_bp, kv_len_b):
    """`paged_attention_reference` with jax's ragged paged attention kernel (TPU only)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    b, _, h = q_bnh.shape
    cu_q_lens = jnp.arange(b + 1, dtype=jnp.int32)  # one query per row
    return ragged_paged_attention(
        q_bnh.astype(pool_pckh.dtype),
        pool_pckh,
        kv_len_b.astype(jnp.int32),
        page_table_bp.astype(jnp.int32),
        cu_q_lens,
        jnp.array([b], jnp.int32),
        sm_scale=h**-0.5,
    ).astype(q_bnh.dtype)


def paged_decode_attention(q_bnh, pool_pckh, page_table_bp, kv_len_b, impl: str = "auto"):
    """Decode attention over pages: the TPU kernel on TPU ("auto"), else the reference."""
    if impl == "auto":
        impl = "tpu" if jax.default_backend() == "tpu" else "reference"
    if impl == "tpu":
        return paged_attention_tpu(q_bnh, pool_pckh, page_table_bp, kv_len_b)
    return paged_attention_reference(q_bnh, pool_pckh, page_table_bp, kv_len_b)
