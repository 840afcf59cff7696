"""Grouped-query softmax attention implementations used by `models/decoder.py`.

Shape letters as in decoder.py: B batch, T query positions, S key positions, N query heads, K kv
heads, G = N // K, H head dim. Queries are [B, T, N, H], keys and values [B, S, K, H]; outputs
[B, T, N, H] in the values' dtype; scores and softmax accumulate in float32.

`attend`, `attend_one_query`, `attend_in_query_chunks` take an explicit boolean mask [B, T, S]
(True = may attend): the KV-cache path uses them. `self_attention` is the training / scoring
path (S = T, causal, padding given per position) and picks one implementation by name
(`model.attention_impl`):

- `xla`: `attend` on the whole [B, N, T, T] score matrix (the reference);
- `chunked`: `attend_in_query_chunks`, `chunk_size` queries at a time ([B, N, C, T] scores);
- `splash`: the Pallas TPU splash-attention kernel shipped with jax (flash attention: no score
  matrix in HBM, forward and backward), causal mask + segment ids for the padding, under
  `shard_map` over the batch (and heads) when a mesh is set; `interpret=True` (or running on a
  CPU) runs it in the Pallas interpreter, which the tests use;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16). cuDNN takes
  padding as sequence lengths with the real tokens first, so each left-padded row is rotated to
  put its real tokens first and the output rotated back;
- `auto`: splash on TPU, cudnn on GPU for bf16/fp16, else chunked when T > chunk_size (or
  2,048 when no chunk is set), else xla.

Padding: `mask_bt[b, s]` False marks padding. Query t attends keys s <= t with mask True (xla,
chunked). Outputs at padding positions are finite but differ between implementations; only
real positions are defined (the loss masks the rest, so gradients agree too).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from htpo_jax.infra.sharding import logical_to_mesh_spec

ATTENTION_IMPLS = ("auto", "xla", "chunked", "splash", "cudnn")
AUTO_CHUNK = 2048  # auto: above this many positions the XLA path goes query-chunked

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


def causal_mask(mask_bt):
    """[B, T] key validity -> [B, T, S=T] causal mask (query t sees valid keys s <= t)."""
    t = mask_bt.shape[1]
    return jnp.tril(jnp.ones((t, t), jnp.bool_))[None] & mask_bt[:, None, :]


def current_platform() -> str:
    """The platform the code is being compiled for: the set mesh's devices, else the default."""
    mesh = jax.sharding.get_abstract_mesh()  # works inside jit, unlike get_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_impl(impl: str, t: int, dtype, chunk_size: int | None, platform: str | None = None):
    """The concrete implementation `impl` stands for at sequence length t (see module doc)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}; choose one of {list(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    platform = platform or current_platform()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "chunked" if t > (chunk_size or AUTO_CHUNK) else "xla"


def self_attention(q_btnh, k_btkh, v_btkh, mask_bt, *, impl="auto", chunk_size=None, platform=None):
    """Causal self-attention over a padded batch (keys = the same T positions as the queries)."""
    t = q_btnh.shape[1]
    impl = resolve_impl(impl, t, q_btnh.dtype, chunk_size, platform)
    mask_bt = mask_bt.astype(jnp.bool_)
    if impl == "xla":
        return attend(q_btnh, k_btkh, v_btkh, causal_mask(mask_bt))
    if impl == "chunked":
        return _chunked_self_attention(q_btnh, k_btkh, v_btkh, mask_bt, chunk_size or AUTO_CHUNK)
    if impl == "splash":
        return splash_self_attention(q_btnh, k_btkh, v_btkh, mask_bt)
    return cudnn_self_attention(q_btnh, k_btkh, v_btkh, mask_bt)


def _chunked_self_attention(q_btnh, k_bskh, v_bskh, mask_bs, chunk_size):
    """`attend_in_query_chunks` with each block's [B, C, S] mask built inside the block (the
    whole [B, T, S] mask is never materialized)."""
    b, t, n, h = q_btnh.shape
    if t <= chunk_size:
        return attend(q_btnh, k_bskh, v_bskh, causal_mask(mask_bs))
    nc = -(-t // chunk_size)
    pad = nc * chunk_size - t
    q = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.reshape(b, nc, chunk_size, n, h).swapaxes(0, 1)  # [nc, B, C, N, H]

    def block(args):
        q_bcnh, c = args
        rows_c = c * chunk_size + jnp.arange(chunk_size)
        mask_bcs = (jnp.arange(t)[None, :] <= rows_c[:, None])[None] & mask_bs[:, None, :]
        return attend(q_bcnh, k_bskh, v_bskh, mask_bcs)

    out = jax.lax.map(jax.checkpoint(block), (q, jnp.arange(nc)))  # [nc, B, C, N, H]
    return out.swapaxes(0, 1).reshape(b, nc * chunk_size, n, h)[:, :t]  # [B, T, N, H]


# ---------------------------------------------------------------------------- splash (TPU)
def _splash_block(t: int) -> int:
    return 512 if t >= 512 else max(128, -(-t // 128) * 128)


def _splash_local(q_btnh, k_btkh, v_btkh, mask_bt, *, interpret: bool):
    """Splash on one shard: vmap over the batch of the per-example kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q_btnh.shape
    block = _splash_block(t)
    tp = -(-t // block) * block  # the kernel works on whole blocks: pad T (segment id 0)
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    # The kernel does not scale the scores: fold 1/sqrt(H) into q (in float32, then back).
    q = (q_btnh.astype(jnp.float32) * h**-0.5).astype(q_btnh.dtype)
    q_bnth = jnp.pad(q, pad).transpose(0, 2, 1, 3)  # [B, N, T, H]
    k_bkth = jnp.pad(k_btkh, pad).transpose(0, 2, 1, 3)  # [B, K, T, H]
    v_bkth = jnp.pad(v_btkh, pad).transpose(0, 2, 1, 3)
    seg_bt = jnp.pad(mask_bt.astype(jnp.int32), ((0, 0), (0, tp - t)))
    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(n)])
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = sk.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    run = lambda q, k, v, seg: kernel(q, k, v, segment_ids=sk.SegmentIds(q=seg, kv=seg))
    out_bnth = jax.vmap(run)(q_bnth, k_bkth, v_bkth, seg_bt)
    return out_bnth.transpose(0, 2, 1, 3)[:, :t].astype(v_btkh.dtype)  # [B, T, N, H]


def splash_self_attention(q_btnh, k_btkh, v_btkh, mask_bt, *, interpret=None):
    """Splash attention; under a mesh, `shard_map` over the batch (data, fsdp) and the heads
    (tensor, when it divides both N and K) with T whole on every shard."""
    if interpret is None:
        interpret = current_platform() != "tpu"
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_btnh, k_btkh, v_btkh, mask_bt)
    q_spec = logical_to_mesh_spec(("act_batch", None, "act_heads", None), q_btnh.shape, mesh)
    k_spec = logical_to_mesh_spec(("act_batch", None, "act_kv_heads", None), k_btkh.shape, mesh)
    if q_spec[2] != k_spec[2]:  # heads split unevenly between q and kv: keep heads whole
        q_spec = jax.P(q_spec[0], None, None, None)
        k_spec = jax.P(q_spec[0], None, None, None)
    m_spec = jax.P(q_spec[0], None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, k_spec, k_spec, m_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q_btnh, k_btkh, v_btkh, mask_bt)


# ---------------------------------------------------------------------------- cudnn (GPU)
def cudnn_self_attention(q_btnh, k_btkh, v_btkh, mask_bt, *, implementation="cudnn"):
    """cuDNN flash attention. cuDNN takes padding as lengths with the real tokens FIRST, so
    each row is rotated left by its left padding (relative order kept: causal attention among
    the real tokens is unchanged) and the output rotated back. Right padding (after a
    response) needs nothing: those keys are in every real query's future. (`implementation`
    is passed on: "xla" runs the same path on any device, for tests.)"""
    b, t = mask_bt.shape
    left_b = jnp.argmax(mask_bt, axis=1).astype(jnp.int32)  # leading padding of each row
    left_b = jnp.where(mask_bt.any(axis=1), left_b, 0)
    fwd_bt = (jnp.arange(t)[None, :] + left_b[:, None]) % t
    back_bt = (jnp.arange(t)[None, :] - left_b[:, None]) % t
    take = lambda x, idx: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
    lengths_b = (t - left_b).astype(jnp.int32)
    out = jax.nn.dot_product_attention(
        take(q_btnh, fwd_bt),
        take(k_btkh, fwd_bt),
        take(v_btkh, fwd_bt),
        is_causal=True,
        query_seq_lengths=lengths_b,
        key_value_seq_lengths=lengths_b,
        implementation=implementation,
    )
    return take(out, back_bt).astype(v_btkh.dtype)
