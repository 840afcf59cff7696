"""Weight-only quantization of a frozen `DenseGeneral` kernel for QLoRA bases
(`model.lora.base_dtype: int8 | nf4`, models/lora.py): the codes and scales it is stored as, and
the kernel back in the compute dtype (`dequantize`, called inside every forward).

A kernel is [*lead, *in, *out] (lead: the stacked-layer axis, or none inside the layer scan).
Both formats keep the codes in the kernel's own shape (so they shard like it) and one float32
absmax scale per block of the flattened input, per output element and layer:

- int8: symmetric, per output channel (one block = the whole input): codes round(w / s) in
  [-127, 127], s = absmax / 127; scale [*lead, 1, *out].
- nf4: QLoRA's NormalFloat-4 (Dettmers et al. 2023, appendix E; the same 16 values as qwix's
  `nf4` and bitsandbytes): blocks of `block_size` consecutive inputs (64 by default, as
  bitsandbytes: consecutive in HF's row-major [out, in] weight = in the flattened *in here),
  s = the block's absmax, code = the nearest codebook value of w / s, stored as uint4 (half a
  byte each where the backend packs it: TPU); scale [*lead, prod(in) / block_size, *out].
  Scales are not quantized again (no double quantization): 0.5 + 4/64 bytes a weight.

Everything is elementwise or a reduction over the block axis (the nearest value is a count of
midpoints below w / s, the lookup a tree of selects), so sharded codes dequantize on their own
shards (see models/lora.py on why not qwix's own nf4 conversion).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

QTYPES = ("int8", "nf4")
INT8_MAX = 127.0
# The NF4 codebook: QLoRA's paper, appendix E (bitsandbytes' and qwix's table).
NF4_CODEBOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


def num_blocks(in_size: int, qtype: str, block_size: int) -> int:
    """Scales per output element along the flattened input (1 for int8); a ValueError when
    nf4's `block_size` does not divide `in_size`."""
    if qtype == "int8":
        return 1
    if qtype != "nf4":
        raise ValueError(f"unknown quantized type {qtype!r}; known: {', '.join(QTYPES)}")
    if block_size <= 0 or in_size % block_size:
        raise ValueError(f"block size {block_size} does not divide the input size {in_size}")
    return in_size // block_size


def scale_shape(shape, lead: int, in_ndim: int, qtype: str, block_size: int) -> tuple:
    """Shape of the scales of a kernel of `shape` ([*lead, *in, *out])."""
    in_size = math.prod(shape[lead : lead + in_ndim])
    nb = num_blocks(in_size, qtype, block_size)
    return tuple(shape[:lead]) + (nb,) + tuple(shape[lead + in_ndim :])


def _blocked(x, lead: int, in_ndim: int, nb: int):
    """x [*lead, *in, *out] -> [*lead, nb, prod(in) / nb, *out]."""
    s = x.shape
    return x.reshape(s[:lead] + (nb, -1) + s[lead + in_ndim :])


def quantize(w, qtype: str, lead: int, in_ndim: int, block_size: int = 64):
    """(codes, scale) of kernel `w` [*lead, *in, *out]: codes in `w`'s shape (int8 or uint4),
    float32 scales [*lead, blocks, *out] (see the module docstring). Deterministic."""
    w = jnp.asarray(w, jnp.float32)
    nb = num_blocks(math.prod(w.shape[lead : lead + in_ndim]), qtype, block_size)
    wb = _blocked(w, lead, in_ndim, nb)
    absmax = jnp.max(jnp.abs(wb), axis=lead + 1, keepdims=True)
    bound = INT8_MAX if qtype == "int8" else 1.0
    scale = jnp.where(absmax > 0, absmax / bound, 1.0)  # an all-zero block: any scale works
    x = wb / scale
    if qtype == "int8":
        codes = jnp.clip(jnp.round(x), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    else:  # the nearest codebook value: how many midpoints lie below x
        mids = jnp.asarray(_NF4_MIDPOINTS)
        codes = (x[..., None] > mids).sum(-1, dtype=jnp.int32).astype(jnp.uint4)
    return codes.reshape(w.shape), jnp.squeeze(scale, lead + 1)


def _nf4_values(codes, dtype):
    """NF4_CODEBOOK[codes] in `dtype` by a tree of selects on the code's bits (elementwise)."""
    c = codes.astype(jnp.int32)
    vals = [jnp.asarray(v, dtype) for v in NF4_CODEBOOK]
    for bit in range(4):  # pair neighbours by the lowest remaining bit: 16 -> 8 -> 4 -> 2 -> 1
        on = (c >> bit) & 1 == 1
        vals = [jnp.where(on, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
    return vals[0]


def dequantize(codes, scale, qtype: str, lead: int, in_ndim: int, dtype=jnp.float32):
    """The kernel [*lead, *in, *out] back from its codes and scales, computed in `dtype` (the
    scales cast to it first: the same result whether or not they were cast before)."""
    dtype = jnp.dtype(dtype)
    vals = codes.astype(dtype) if qtype == "int8" else _nf4_values(codes, dtype)
    s = scale.astype(dtype)
    nb = scale.shape[lead]
    if nb == 1:  # one block per output: broadcast over the input axes, no reshape
        s = s.reshape(s.shape[:lead] + (1,) * in_ndim + s.shape[lead + 1 :])
        return vals * s
    out = _blocked(vals, lead, in_ndim, nb) * jnp.expand_dims(s, lead + 1)
    return out.reshape(codes.shape)


def stored_bytes(codes, scale) -> int:
    """Bytes the quantized kernel is stored in (uint4 counted as half a byte)."""
    bits = 4 if codes.dtype == jnp.uint4 else 8 * codes.dtype.itemsize
    return math.ceil(codes.size * bits / 8) + scale.size * scale.dtype.itemsize
