"""Exact per-row order statistics without sorting: the k-th largest value of each row.

HTPO needs, per response, the k-th largest entropy among its valid tokens (k varies per row). A
sort or `lax.top_k` per row is the slow part of a naive loss. Here each float is mapped to an
unsigned integer key with the same order, and the k-th largest key of every row is built one bit at
a time, most significant first: bit b is set iff at least k valid keys are >= (prefix | bit b).
That is one compare-and-count pass over the batch per bit (32 for float32, 64 for float64, 16 for
bfloat16), fully vectorized over rows, exact with ties counted with multiplicity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

UNROLL = 1  # loop iterations fused per step: runtime vs compile time
_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def ordered_keys(x: jax.Array) -> jax.Array:
    """Map floats to unsigned ints with the same order (-0.0 and +0.0 get the same key).

    Non-negative floats keep their bits with the sign bit set; negative floats have all bits
    flipped, so more negative gives a smaller key. Key 0 is never produced by a real number.
    """
    x = jnp.where(x == 0, jnp.zeros_like(x), x)
    udt = _UINT[x.dtype.itemsize]
    bits = lax.bitcast_convert_type(x, udt)
    sign = jnp.asarray(1 << (8 * x.dtype.itemsize - 1), udt)
    return jnp.where(bits & sign, ~bits, bits | sign)


def masked_keys(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Ordered keys with invalid entries set to 0 (below every real key): never counted."""
    keys = ordered_keys(x)
    return jnp.where(valid, keys, jnp.zeros_like(keys))


def kth_largest_keys(keys: jax.Array, ranks: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """For keys [R, N] (0 = invalid) and 1-based ranks [R] each, the rank-th largest key per row.

    Several ranks share each pass over `keys`. A row with fewer than `rank` valid keys gets the
    largest t with count(keys >= t) >= rank, which is 0 when nothing qualifies.
    """
    nbits = 8 * keys.dtype.itemsize
    dt = keys.dtype
    # Counting in float32 is exact below 2**24 and vectorizes better on CPU than an int32 sum.
    count_dt = jnp.float32 if keys.shape[-1] < 2**24 else jnp.int32

    def body(i, answers):
        bit = jnp.left_shift(jnp.asarray(1, dt), (nbits - 1 - i).astype(dt))
        out = []
        for ans, rank in zip(answers, ranks, strict=True):
            cand = ans | bit  # [R]
            count = jnp.sum((keys >= cand[:, None]).astype(count_dt), axis=-1)  # [R]
            out.append(jnp.where(count >= rank, cand, ans))
        return tuple(out)

    init = tuple(jnp.zeros(keys.shape[:1], dt) for _ in ranks)
    return lax.fori_loop(0, nbits, body, init, unroll=UNROLL)


def key_values(keys: jax.Array, dtype) -> jax.Array:
    """The floats of `ordered_keys` keys (the inverse map; -0.0 comes back as +0.0)."""
    sign = jnp.asarray(1 << (8 * jnp.dtype(dtype).itemsize - 1), keys.dtype)
    return lax.bitcast_convert_type(jnp.where(keys & sign, keys ^ sign, ~keys), dtype)
