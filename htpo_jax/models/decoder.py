"""One Flax NNX decoder for Qwen3, Qwen2/2.5 and Llama 3/3.1, switched by `ModelConfig`.

Qwen3: q/k RMS norm per head, no biases. Qwen2: q/k/v biases. Llama 3.1: llama3 rope scaling.
All: grouped-query attention, SwiGLU MLP, RMSNorm, tied or untied embeddings. Compute runs in
`dtype`, parameters are stored in `param_dtype` (e.g. bf16 compute over float32 parameters);
RMSNorm statistics, rope, softmax and the unembedding accumulate in float32.

Shape letters: B batch, T query positions, S key positions / cache slots, D hidden, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim, F MLP width, V vocabulary.

Full-sequence API (training, scoring)
-------------------------------------
    logits_btv = model(input_ids_bt, attention_mask_bt=None)           # float32 [B, T, V]
    hidden_btd = model.hidden_states(input_ids_bt, attention_mask_bt)  # final-normed [B, T, D]
    logits     = model.unembed(hidden_...d)                            # float32 [..., V]
Prompts are left padded; positions are `cumsum(attention_mask) - 1` clipped at 0, and padding
keys are masked out. Rows at padding positions are finite but meaningless.

KV-cache API (sampling; all of it works inside jit and lax.while_loop)
---------------------------------------------------------------------
    cache = model.init_cache(batch, max_len, dtype=None)
        -> tuple of `LayerCache(k, v)`, one per layer, each k and v zeros [B, S=max_len, K, H]
           (dtype defaults to the model's compute dtype). Logical axes for sharding:
           `CACHE_LOGICAL_AXES`.
    hidden_btd, cache = model.forward_cached(input_ids_bt, positions_bt, cache, cache_index,
                                             kv_mask_bs)
        input_ids_bt  int [B, T]: the new tokens (T = prompt length for prefill, 1 for decode)
        positions_bt  int [B, T]: their rope positions (left-padded prefill: clip(cumsum(m)-1, 0);
                      decode: last position + 1)
        cache_index   scalar int (may be traced): the new tokens go to slots
                      [cache_index, cache_index + T) of every row
        kv_mask_bs    bool [B, S]: which slots hold real tokens, INCLUDING the T being written now
                      (prefill: the prompt's attention_mask in slots [0, T); decode: also set
                      slot cache_index to True before the call)
        returns the final-normed hidden states [B, T, D] (logits of the last token:
        `model.unembed(hidden_btd[:, -1])`) and the updated cache.
    A query in slot `cache_index + t` attends to the slots s <= cache_index + t with kv_mask True.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.models.model_config import ModelConfig
from htpo_jax.sharding import constrain

CACHE_LOGICAL_AXES = ("cache_batch", "cache_seq", "cache_kv_heads", "head_dim")
_NEG_INF = float(np.finfo(np.float32).min)  # finite: fully masked rows give no NaN


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's keys and values, each [B, S, K, H] (S = max_len cache slots)."""

    k: jax.Array
    v: jax.Array


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, dtype)


class DenseGeneral(nnx.Module):
    """`y = einsum(spec, x, kernel) + bias` with a multi-axis kernel [*in_shape, *out_shape].

    HF stores the same weight as a 2-d [prod(out_shape), prod(in_shape)] matrix; `hf_io` converts
    using `in_ndim`.
    """

    def __init__(self, spec, in_shape, out_shape, logical_axes, *, bias, dtype, param_dtype, rngs):
        self.spec, self.in_ndim, self.dtype = spec, len(in_shape), dtype
        shape = tuple(in_shape) + tuple(out_shape)
        self.kernel = nnx.Param(_init(rngs, shape, param_dtype), logical_axes=logical_axes)
        self.bias = (
            nnx.Param(jnp.zeros(out_shape, param_dtype), logical_axes=logical_axes[self.in_ndim :])
            if bias
            else None
        )

    def __call__(self, x):
        y = jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, *, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with llama3 scaling when configured."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_btnh, positions_bt, inv_freq):
    """Rotary embedding, HF 'rotate_half' layout (the two halves of H are the pairs)."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]  # [B, T, 1, H/2]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def attend(q_btnh, k_bskh, v_bskh, mask_bts):
    """Grouped-query softmax attention; float32 scores and softmax."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    if t == 1:
        return attend_one_query(q_btnh, k_bskh, v_bskh, mask_bts)
    q = q_btnh.reshape(b, t, k, n // k, h)  # [B, T, K, G, H]: query head n = kv head k * G + g
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bts[:, None, None], scores * (h**-0.5), _NEG_INF)
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
    scores_bskg = jnp.where(mask_b1s[:, 0, :, None, None], scores_bskg, _NEG_INF)
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


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, chunk_size=None):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = DenseGeneral(
            "btd,dnh->btnh", (d,), (n, h), ("embed", "heads", "head_dim"), bias=cfg.qkv_bias, **kw
        )
        self.k_proj = DenseGeneral(
            "btd,dkh->btkh",
            (d,),
            (k, h),
            ("embed", "kv_heads", "head_dim"),
            bias=cfg.qkv_bias,
            **kw,
        )
        self.v_proj = DenseGeneral(
            "btd,dkh->btkh",
            (d,),
            (k, h),
            ("embed", "kv_heads", "head_dim"),
            bias=cfg.qkv_bias,
            **kw,
        )
        self.o_proj = DenseGeneral(
            "btnh,nhd->btd", (n, h), (d,), ("heads", "head_dim", "embed"), bias=cfg.o_bias, **kw
        )
        norm = lambda: RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.q_norm = norm() if cfg.qk_norm else None
        self.k_norm = norm() if cfg.qk_norm else None
        self.cfg, self.chunk_size = cfg, chunk_size

    def __call__(self, x_btd, positions_bt, mask_bts, cache=None, cache_index=None):
        q = constrain(self.q_proj(x_btd), ("act_batch", "act_seq", "act_heads", None))
        k = constrain(self.k_proj(x_btd), ("act_batch", "act_seq", "act_kv_heads", None))
        v = constrain(self.v_proj(x_btd), ("act_batch", "act_seq", "act_kv_heads", None))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(self.cfg)  # a trace-time constant, not a parameter
        q = apply_rope(q, positions_bt, inv_freq)
        k = apply_rope(k, positions_bt, inv_freq)
        if cache is not None:
            # [B, S, K, H] <- [B, T, K, H] written at slots [cache_index, cache_index + T).
            start = (0, cache_index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
            v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
            cache = LayerCache(k=k_all, v=v_all)
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        out = attend_in_query_chunks(q, k, v, mask_bts, self.chunk_size)  # [B, T, N, H]
        return self.o_proj(out), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = DenseGeneral("btd,df->btf", (d,), (f,), ("embed", "mlp"), **kw)
        self.up_proj = DenseGeneral("btd,df->btf", (d,), (f,), ("embed", "mlp"), **kw)
        self.down_proj = DenseGeneral("btf,fd->btd", (f,), (d,), ("mlp", "embed"), **kw)

    def __call__(self, x_btd):
        h = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        return self.down_proj(constrain(h, ("act_batch", "act_seq", "act_mlp")))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, attention_chunk_size=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, chunk_size=attention_chunk_size, **kw)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype
        )
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x_btd, positions_bt, mask_bts, cache=None, cache_index=None):
        attn, cache = self.self_attn(
            self.input_layernorm(x_btd), positions_bt, mask_bts, cache, cache_index
        )
        x_btd = x_btd + attn
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        return constrain(x_btd, ("act_batch", "act_seq", "act_embed")), cache


def _layer_forward(layer, x_btd, positions_bt, mask_bts):
    return layer(x_btd, positions_bt, mask_bts)[0]


_remat_layer_forward = nnx.remat(_layer_forward)


def positions_from_mask(attention_mask_bt):
    """Left padding: the first real token is position 0; padding gets position 0 too."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
    """Decoder-only LM.

    `remat=True` recomputes each layer in the backward pass. `attention_chunk_size` (None: all
    queries at once) bounds the attention scores held at a time to that many query positions.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=None,
        remat: bool = False,
        attention_chunk_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.cfg, self.dtype, self.param_dtype, self.remat = cfg, dtype, param_dtype, remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = nnx.Param(
            _init(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype),
            logical_axes=("vocab", "embed"),
        )
        layer_kw = dict(kw, attention_chunk_size=attention_chunk_size)
        self.layers = nnx.List([DecoderLayer(cfg, **layer_kw) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(
                _init(rngs, (cfg.hidden_size, cfg.vocab_size), param_dtype),
                logical_axes=("embed", "vocab"),
            )
        )

    def _embed(self, input_ids_bt):
        # All-gather the table first (as FSDP does for every weight): a gather from a table split
        # over both vocab and embed makes the SPMD partitioner replicate its output instead.
        table_vd = constrain(self.embed_tokens[...], (None, None))
        x = jnp.take(table_vd, input_ids_bt, axis=0).astype(self.dtype)
        return constrain(x, ("act_batch", "act_seq", "act_embed"))  # [B, T, D]

    def unembed_weight(self):
        """The unembedding matrix [D, V] in the compute dtype (embedding transposed if tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T.astype(self.dtype)
        return self.lm_head[...].astype(self.dtype)

    def unembed(self, hidden_xd):
        """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
        w_dv = self.unembed_weight()
        return jnp.einsum(
            "...d,dv->...v", hidden_xd.astype(self.dtype), w_dv, preferred_element_type=jnp.float32
        )

    def hidden_states(self, input_ids_bt, attention_mask_bt=None, positions_bt=None):
        """Final-normed hidden states [B, T, D] of a (left-padded) batch."""
        _, t = input_ids_bt.shape
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones(input_ids_bt.shape, jnp.bool_)
        attention_mask_bt = attention_mask_bt.astype(jnp.bool_)
        if positions_bt is None:
            positions_bt = positions_from_mask(attention_mask_bt)
        causal_tt = jnp.tril(jnp.ones((t, t), jnp.bool_))
        mask_bts = causal_tt[None] & attention_mask_bt[:, None, :]  # [B, T, S=T]
        x = self._embed(input_ids_bt)
        for layer in self.layers:
            fwd = _remat_layer_forward if self.remat else _layer_forward
            x = fwd(layer, x, positions_bt, mask_bts)
        return self.norm(x)

    def __call__(self, input_ids_bt, attention_mask_bt=None):
        logits = self.unembed(self.hidden_states(input_ids_bt, attention_mask_bt))
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"))  # [B, T, V] float32

    # ------------------------------------------------------------------ KV cache
    def init_cache(self, batch: int, max_len: int, dtype=None) -> tuple[LayerCache, ...]:
        dtype = self.dtype if dtype is None else dtype
        shape = (batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)  # [B, S, K, H]
        return tuple(
            LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
            for _ in range(self.cfg.num_layers)
        )

    def forward_cached(self, input_ids_bt, positions_bt, cache, cache_index, kv_mask_bs):
        """Prefill (T = prompt length) or decode (T = 1) step; see the module docstring."""
        t = input_ids_bt.shape[1]
        s = cache[0].k.shape[1]
        slot_t = cache_index + jnp.arange(t)  # cache slot of each new token
        causal_ts = jnp.arange(s)[None, :] <= slot_t[:, None]  # [T, S]
        mask_bts = causal_ts[None] & kv_mask_bs.astype(jnp.bool_)[:, None, :]  # [B, T, S]
        x = self._embed(input_ids_bt)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer(x, positions_bt, mask_bts, layer_cache, cache_index)
            new_cache.append(layer_cache)
        return self.norm(x), tuple(new_cache)
