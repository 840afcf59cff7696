"""One Flax NNX decoder for Qwen3, Qwen2/2.5 and Llama 3/3.1, switched by `ModelConfig`.

Qwen3: q/k RMS norm per head, no biases. Qwen2: q/k/v biases. Llama 3.1: llama3 rope scaling.
All: grouped-query attention, SwiGLU MLP, RMSNorm, tied or untied embeddings. Compute runs in
`dtype`, parameters are stored in `param_dtype` (e.g. bf16 compute over float32 parameters);
RMSNorm statistics, rope, softmax and the unembedding accumulate in float32.

Shape letters: L layers, B batch, T query positions, S key positions / cache slots, D hidden,
N query heads, K kv heads, G = N // K query heads per kv head, H head dim, F MLP width,
V vocabulary.

Layers: with `scan_layers=True` (the default) `model.layers` is ONE `DecoderLayer` whose
parameters are stacked with a leading layer axis [L, ...] (logical axis `layers`, never sharded),
applied with `lax.scan`, so the compiled program and compile time do not grow with depth; with
`scan_layers=False` it is an `nnx.List` of L layers applied by a Python loop. Both give the same
results; `hf_io` reads and writes either from the same HF checkpoint.

Full-sequence API (training, scoring)
-------------------------------------
    logits_btv = model(input_ids_bt, attention_mask=None)               # float32 [B, T, V]
    hidden_btd = model.hidden_states(input_ids_bt, attention_mask_bt)  # final-normed [B, T, D]
    logits     = model.unembed(hidden_...d)                            # float32 [..., V]
Prompts are left padded; positions are `cumsum(attention_mask) - 1` clipped at 0, and padding
keys are masked out. Rows at padding positions are finite but meaningless.

Pluggable KV state (sampling; all of it works inside jit and lax.while_loop)
---------------------------------------------------------------------------
    hidden_btd, kv_state = model.forward_kv(input_ids_bt, positions_bt, kv_state, kv_fn)
        kv_state: any pytree whose leaves have a leading layer axis [L, ...] (a dense cache, a
            paged cache, ...). It is carried through the layers (scan carry or loop variable),
            never split into per-layer copies, so its buffers can be updated in place.
        kv_fn(layer, q_btnh, k_btkh, v_btkh, kv_state) -> (out_btnh, kv_state): for layer
            `layer` (an int32 scalar, traced when the layers are scanned) write this step's
            keys/values [B, T, K, H] (rope applied) into kv_state and attend the queries
            [B, T, N, H] (rope applied) to what is stored; returns the attention output
            [B, T, N, H] before the output projection. `per_layer(fn)` adapts a function of one
            layer's slice, fn(q, k, v, kv_state_l) -> (out, new_kv_state_l).
        returns the final-normed hidden states [B, T, D] and the updated kv_state.

The dense cache is one such kv_fn (`dense_kv_fn`):
    cache = model.init_cache(batch, max_len, dtype=None)
        -> `KVCache(k, v)`, each zeros [L, B, S=max_len, K, H] (dtype defaults to the model's
           compute dtype). Logical axes for sharding: `CACHE_LOGICAL_AXES`.
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

from htpo_jax.infra.sharding import constrain
from htpo_jax.models import quant
from htpo_jax.models.attention import attend_in_query_chunks, resolve_impl, self_attention
from htpo_jax.models.model_config import ModelConfig

CACHE_LOGICAL_AXES = ("cache_layers", "cache_batch", "cache_seq", "cache_kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The dense cache: keys and values of every layer, each [L, B, S, K, H] (S cache slots)."""

    k: jax.Array
    v: jax.Array


LayerCache = KVCache  # the name before the layers were stacked


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, dtype)


def compute_copy(param: nnx.Param, dtype) -> jax.Array:
    """`param` in the compute dtype, cast on its own shards: the constraint keeps the cast value
    sharded like the parameter, so FSDP's all-gather that follows moves `dtype` (bf16), not the
    float32 master copy, and the gradient comes back reduce-scattered before it is upcast."""
    x = param[...]
    y = x.astype(dtype)
    axes = param.get_metadata().get("logical_axes")
    if axes is None or y.dtype == x.dtype:
        return y
    return constrain(y, tuple(axes)[len(axes) - x.ndim :])  # in the layer scan: no stacked axis


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
        y = jnp.einsum(self.spec, x.astype(self.dtype), self.compute_kernel())
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if getattr(self, "lora_a", None) is not None:  # set by models/lora.add_adapters
            y = y + self.lora_delta(x)
        return y

    def compute_kernel(self) -> jax.Array:
        """The kernel in the compute dtype: the parameter cast, or a QLoRA base's codes
        dequantized (`kernel_codes` / `kernel_scale`, set by models/lora.quantize_base) on the
        codes' own shards, like `compute_copy`."""
        codes = getattr(self, "kernel_codes", None)
        if codes is None:
            return compute_copy(self.kernel, self.dtype)
        lead = codes.ndim - len(self.spec.split(",")[1].split("->")[0])  # 0 in the layer scan
        w = quant.dequantize(
            codes[...], self.kernel_scale[...], self.quant, lead, self.in_ndim, self.dtype
        )
        axes = codes.get_metadata().get("logical_axes")
        return w if axes is None else constrain(w, tuple(axes)[len(axes) - w.ndim :])

    def lora_delta(self, x):
        """The low-rank update `scale * (x @ A) @ B`, never forming the [in, out] product:
        A [*in, r], B [r, *out] (models/lora.py), computed in the compute dtype."""
        lhs, rest = self.spec.split(",")
        rhs, out = rest.split("->")
        ins, outs = rhs[: self.in_ndim], rhs[self.in_ndim :]
        kept = "".join(c for c in lhs if c not in ins)  # the lhs axes that are not contracted
        a, b = compute_copy(self.lora_a, self.dtype), compute_copy(self.lora_b, self.dtype)
        xa = jnp.einsum(f"{lhs},{ins}r->{kept}r", x.astype(self.dtype), a)
        return jnp.einsum(f"{kept}r,r{outs}->{out}", xa, b) * jnp.asarray(self.lora_scale, xa.dtype)


class RMSNorm(nnx.Module):
    """RMS normalization over the last axis, computed in float32, times a learned scale."""

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


class Attention(nnx.Module):
    """q/k/v projections, qk-norm and rope; the attention itself is the caller's `kv_fn`."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
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
        self.cfg = cfg

    def __call__(self, x_btd, positions_bt, kv_fn, kv_state):
        q = constrain(self.q_proj(x_btd), ("act_batch", "act_seq", "act_heads", None))
        k = constrain(self.k_proj(x_btd), ("act_batch", "act_seq", "act_kv_heads", None))
        v = constrain(self.v_proj(x_btd), ("act_batch", "act_seq", "act_kv_heads", None))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(self.cfg)  # a trace-time constant, not a parameter
        q = apply_rope(q, positions_bt, inv_freq)
        k = apply_rope(k, positions_bt, inv_freq)
        out, kv_state = kv_fn(q, k, v, kv_state)  # [B, T, N, H]
        return self.o_proj(out), kv_state


class MLP(nnx.Module):
    """The gated SiLU feed-forward block: down_proj(silu(gate_proj(x)) * up_proj(x))."""

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
    """One pre-norm transformer layer: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype
        )
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x_btd, positions_bt, kv_fn, kv_state):
        """kv_fn(q, k, v, kv_state) -> (out, kv_state) for this layer; returns (x, kv_state)."""
        attn, kv_state = self.self_attn(self.input_layernorm(x_btd), positions_bt, kv_fn, kv_state)
        x_btd = x_btd + attn
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        return constrain(x_btd, ("act_batch", "act_seq", "act_embed")), kv_state


def stacked_layers(make_layer, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`make_layer(rngs)` vmapped over `num_layers` keys: one module, parameters [L, ...].

    The `layers` logical axis is prepended to each parameter's `logical_axes`.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def build(rngs):
        return make_layer(rngs)

    layers = build(rngs)
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Variable) and "logical_axes" in node.get_metadata():
            node.set_metadata(logical_axes=("layers",) + tuple(node.get_metadata()["logical_axes"]))
    return layers


def per_layer(fn):
    """A `kv_fn` from a function of one layer's slice of the KV state.

    fn(q_btnh, k_btkh, v_btkh, kv_state_l) -> (out_btnh, new_kv_state_l), where kv_state_l is
    kv_state with the layer axis indexed away. Simple, but the slice is copied out and back in
    each layer; a kv_fn that writes into the stacked state directly avoids that.
    """

    def kv_fn(layer, q_btnh, k_btkh, v_btkh, kv_state):
        take = lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
        out, new_l = fn(q_btnh, k_btkh, v_btkh, jax.tree.map(take, kv_state))
        put = lambda a, a_l: jax.lax.dynamic_update_index_in_dim(a, a_l.astype(a.dtype), layer, 0)
        return out, jax.tree.map(put, kv_state, new_l)

    return kv_fn


def dense_kv_fn(cache_index, mask_bts):
    """The dense cache's kv_fn: write at slots [cache_index, cache_index + T), attend under
    `mask_bts` [B, T, S] (True = may attend)."""

    def kv_fn(layer, q_btnh, k_btkh, v_btkh, cache):
        if isinstance(cache, tuple):  # per-layer caches, layers unrolled (`layer` a Python int)
            c, start = cache[layer], (0, cache_index, 0, 0)  # [B, S, K, H] at slots [idx, +T)
            k_bskh = jax.lax.dynamic_update_slice(c.k, k_btkh.astype(c.k.dtype), start)
            v_bskh = jax.lax.dynamic_update_slice(c.v, v_btkh.astype(c.v.dtype), start)
            kv = (k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype))
            out = attend_in_query_chunks(q_btnh, *kv, mask_bts, None)
            return out, cache[:layer] + (KVCache(k=k_bskh, v=v_bskh),) + cache[layer + 1 :]
        # [L, B, S, K, H] <- [1, B, T, K, H] at layer `layer`, slots [cache_index, +T).
        start = (layer, 0, cache_index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k_btkh[None].astype(cache.k.dtype), start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v_btkh[None].astype(cache.v.dtype), start)
        k_bskh = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(q_btnh.dtype)
        v_bskh = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(q_btnh.dtype)
        out = attend_in_query_chunks(q_btnh, k_bskh, v_bskh, mask_bts, None)
        return out, KVCache(k=k_all, v=v_all)

    return kv_fn


def positions_from_mask(attention_mask_bt):
    """Left padding: the first real token is position 0; padding gets position 0 too."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
    """Decoder-only LM.

    `remat=True` recomputes each layer in the backward pass. `attention_impl` (auto, xla,
    chunked, splash, cudnn; see `models/attention.py`) picks the training attention;
    `attention_chunk_size` (None: 2,048 for `chunked`) is the chunked path's query block.
    `scan_layers` stacks the layers' parameters and scans over them (see the module docstring).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=None,
        remat: bool = False,
        attention_chunk_size: int | None = None,
        attention_impl: str = "auto",
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.cfg, self.dtype, self.param_dtype, self.remat = cfg, dtype, param_dtype, remat
        self.attention_chunk_size = attention_chunk_size or None
        resolve_impl(attention_impl, 1, dtype, None, "cpu")  # fails early on an unknown name
        self.attention_impl = attention_impl
        self.scan_layers = scan_layers
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = nnx.Param(
            _init(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype),
            logical_axes=("vocab", "embed"),
        )
        if scan_layers:
            self.layers = stacked_layers(
                lambda r: DecoderLayer(cfg, rngs=r, **kw), cfg.num_layers, rngs
            )
        else:
            self.layers = nnx.List(
                [DecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)]
            )
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
        table_vd = constrain(compute_copy(self.embed_tokens, self.dtype), (None, None))
        x = jnp.take(table_vd, input_ids_bt, axis=0)
        return constrain(x, ("act_batch", "act_seq", "act_embed"))  # [B, T, D]

    def unembed_weight(self):
        """The unembedding matrix [D, V] in the compute dtype (embedding transposed if tied)."""
        if self.lm_head is None:
            return compute_copy(self.embed_tokens, self.dtype).T
        return compute_copy(self.lm_head, self.dtype)

    def unembed(self, hidden_xd):
        """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
        w_dv = self.unembed_weight()
        return jnp.einsum(
            "...d,dv->...v", hidden_xd.astype(self.dtype), w_dv, preferred_element_type=jnp.float32
        )

    def layer_states(self) -> list:
        """Each layer's parameters as arrays of their own (static slices of the stacked ones when
        the layers are scanned). Taken outside a loop and passed to `forward_kv(layer_states=)`,
        the layers run unrolled on loop-invariant weights: XLA:CPU copies a slice of a stacked
        weight on every use, inside a loop on every iteration."""
        if not self.scan_layers:
            return [nnx.state(m) for m in self.layers]
        stacked = nnx.state(self.layers)
        return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.num_layers)]

    def _run_layers(self, x_btd, positions_bt, kv_fn, kv_state, remat: bool, layer_states=None):
        """Every layer in order; kv_fn(layer, q, k, v, kv_state) -> (out, kv_state). With
        `layer_states` (from `layer_states()`) a Python loop over them (layer: a Python int)."""

        def apply(graphdef, layer_state, layer, x_btd, kv_state):
            module = nnx.merge(graphdef, layer_state)
            bound = lambda q, k, v, kv: kv_fn(layer, q, k, v, kv)
            return module(x_btd, positions_bt, bound, kv_state)

        if layer_states is not None:
            graphdefs = (
                [nnx.graphdef(m) for m in self.layers]
                if not self.scan_layers
                else [nnx.graphdef(self.layers)] * len(layer_states)
            )
            for i, (graphdef, layer_state) in enumerate(zip(graphdefs, layer_states, strict=True)):
                x_btd, kv_state = apply(graphdef, layer_state, i, x_btd, kv_state)
            return x_btd, kv_state

        if not self.scan_layers:
            for i, module in enumerate(self.layers):
                graphdef, layer_state = nnx.split(module)
                fn = functools.partial(apply, graphdef)
                if remat:
                    fn = jax.checkpoint(fn)
                x_btd, kv_state = fn(layer_state, jnp.int32(i), x_btd, kv_state)
            return x_btd, kv_state

        graphdef, stacked_state = nnx.split(self.layers)  # leaves [L, ...]

        def body(carry, xs):
            layer_state, layer = xs
            return apply(graphdef, layer_state, layer, *carry), None

        if remat:  # per layer: the scan saves only each layer's input for the backward pass
            body = jax.checkpoint(body, prevent_cse=False)
        layer_ids = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        (x_btd, kv_state), _ = jax.lax.scan(body, (x_btd, kv_state), (stacked_state, layer_ids))
        return x_btd, kv_state

    def hidden_states(self, input_ids_bt, attention_mask_bt=None, positions_bt=None):
        """Final-normed hidden states [B, T, D] of a (left-padded) batch."""
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones(input_ids_bt.shape, jnp.bool_)
        attention_mask_bt = attention_mask_bt.astype(jnp.bool_)
        if positions_bt is None:
            positions_bt = positions_from_mask(attention_mask_bt)
        attention = functools.partial(
            self_attention, impl=self.attention_impl, chunk_size=self.attention_chunk_size
        )

        def kv_fn(layer, q_btnh, k_btkh, v_btkh, kv_state):
            return attention(q_btnh, k_btkh, v_btkh, attention_mask_bt), kv_state

        x = self._embed(input_ids_bt)
        x, _ = self._run_layers(x, positions_bt, kv_fn, None, self.remat)
        return self.norm(x)

    def __call__(
        self, input_ids_bt=None, attention_mask=None, *, attention_mask_bt=None, input_ids=None
    ):
        """float32 logits [B, T, V]. `input_ids` / `attention_mask` are the HF names (a HF-style
        `model(input_ids=..., attention_mask=...)` works); `input_ids_bt` / `attention_mask_bt`
        the older ones. Positional use is unchanged: `model(ids, mask)`."""
        if input_ids_bt is None:
            input_ids_bt = input_ids
        elif input_ids is not None:
            raise TypeError("pass input_ids or input_ids_bt, not both")
        if input_ids_bt is None:
            raise TypeError("Decoder() needs the token ids: model(input_ids) or input_ids=...")
        if attention_mask is None:
            attention_mask = attention_mask_bt
        elif attention_mask_bt is not None:
            raise TypeError("pass attention_mask or attention_mask_bt, not both")
        logits = self.unembed(self.hidden_states(input_ids_bt, attention_mask))
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"))  # [B, T, V] float32

    # ------------------------------------------------------------------ KV state
    def forward_kv(self, input_ids_bt, positions_bt, kv_state, kv_fn, layer_states=None):
        """New tokens through every layer with a pluggable KV state; see the module docstring.
        `layer_states` (from `layer_states()`): the layers unrolled, kv_fn's `layer` an int."""
        x = self._embed(input_ids_bt)
        x, kv_state = self._run_layers(x, positions_bt, kv_fn, kv_state, False, layer_states)
        return self.norm(x), kv_state

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """A zeroed dense KVCache [L, batch, max_len, K, H] in `dtype` (default: compute dtype)."""
        dtype = self.dtype if dtype is None else dtype
        cfg = self.cfg
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)  # [L, B, S, K, H]
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    def forward_cached(self, input_ids_bt, positions_bt, cache, cache_index, kv_mask_bs,
                       layer_states=None):  # fmt: skip
        """Prefill (T = prompt length) or decode (T = 1) step; see the module docstring. `cache`:
        a `KVCache` [L, B, S, K, H], or with `layer_states` (the layers unrolled) a tuple of
        per-layer `KVCache`s [B, S, K, H]."""
        t = input_ids_bt.shape[1]
        s = (cache[0] if isinstance(cache, tuple) else cache).k.shape[-3]
        slot_t = cache_index + jnp.arange(t)  # cache slot of each new token
        causal_ts = jnp.arange(s)[None, :] <= slot_t[:, None]  # [T, S]
        mask_bts = causal_ts[None] & kv_mask_bs.astype(jnp.bool_)[:, None, :]  # [B, T, S]
        return self.forward_kv(
            input_ids_bt, positions_bt, cache, dense_kv_fn(cache_index, mask_bts), layer_states
        )
