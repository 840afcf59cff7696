"""Sampling math and the rollout data types shared by both samplers (static and paged engine).

Owns: the `Rollout` output, shape buckets, `sample_logits` (temperature, top-k, top-p, Gumbel-max
draw, log-probs under the full tempered distribution), the per-row key rule and the greedy rule
(`sample_step`), the prompt helpers `repeat_prompts` / `full_sequences`, and the entry checks
(`check_args`: keys, prompts, ranges, the position cap). See the package docstring
(`htpo_jax/rollout/__init__.py`) for the contract.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """B sampled responses of N = max_new_tokens slots each (B = prompts * n)."""

    tokens: jax.Array  # [B, N] int32, pad_token_id after the end
    response_mask: jax.Array  # [B, N] int32, 1 up to and including the first EOS
    log_probs: jax.Array  # [B, N] float32, log p_tau(token) (full distribution; 0 after the end)
    lengths: jax.Array  # [B] int32 = response_mask.sum(-1)
    finished: jax.Array  # [B] bool, the response ended with EOS (False: truncated at N)


def bucket(n: int, minimum: int = 8, linear_from: int = 512) -> int:
    """Shape bucket: powers of two from `minimum` up to `linear_from`, then its multiples."""
    if n <= linear_from:
        return max(minimum, 1 << max(0, n - 1).bit_length())
    return math.ceil(n / linear_from) * linear_from


def prompt_bucket(n: int) -> int:
    """The default prompt-length bucket: `bucket(n, minimum=16)`."""
    return bucket(n, minimum=16)


def repeat_prompts(prompt_ids, prompt_mask, n: int):
    """Each prompt n times in a row: rows i*n .. i*n+n-1 are prompt i ([B, P] -> [B*n, P])."""
    return np.repeat(np.asarray(prompt_ids), n, axis=0), np.repeat(np.asarray(prompt_mask), n, 0)


def full_sequences(prompt_ids, prompt_mask, rollout: Rollout):
    """(input_ids [B, P+N], attention_mask [B, P+N]) of prompt + response, for the trainer.

    `logprobs_and_entropy(model, ids, mask)[0][:, P-1:]` lines up with `rollout.log_probs`.
    Prompts must have the rollout's rows (use `repeat_prompts` when n > 1).
    """
    ids = jnp.concatenate([jnp.asarray(prompt_ids), rollout.tokens.astype(jnp.int32)], axis=1)
    mask = jnp.concatenate(
        [jnp.asarray(prompt_mask).astype(jnp.int32), rollout.response_mask.astype(jnp.int32)], 1
    )
    return ids, mask


def argmax_last(x):
    """`jnp.argmax(x, -1)` (first maximum) as two plain reductions.

    XLA:CPU runs argmax's variadic (value, index) reduce an order of magnitude slower than a max
    and a min; with a [B, V] row per decode step that was ~10% of the step.
    """
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(hit, iota, x.shape[-1] - 1), axis=-1)


def gumbel_rows(keys_b, v: int):
    """Standard Gumbel noise [B, V] (float32), row b equal bit for bit to
    `jax.random.gumbel(keys_b[b], (v,))`.

    On CPU jax lowers threefry as a rolled loop of 5 iterations over the whole [B, V] state
    (compile time over speed); at [256, 4096] that was ~9 ms of a ~46 ms decode step. This calls
    jax's own unrolled threefry (`threefry2x32._threefry2x32_lowering`, the lowering jax uses on
    GPU / TPU) with the counters and bits-to-float steps of `jax.random.gumbel` (default "low"
    mode, partitionable threefry): ~3x faster, the same bits
    (`tests/test_rollout.py::test_gumbel_rows_equal_jax_random_gumbel` guards it). Other key
    implementations or settings, or a jax without those internals, take `jax.random.gumbel`.
    """
    fast = (
        _threefry is not None
        and str(jax.random.key_impl(keys_b)) == "threefry2x32"
        and jax.config.jax_threefry_partitionable
        and not jax.config.jax_high_dynamic_range_gumbel
    )
    if not fast:
        return jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys_b)
    threefry, iota_2x32_shape = _threefry
    kd = jax.random.key_data(keys_b)  # [B, 2] uint32
    c1, c2 = iota_2x32_shape((v,))
    b1, b2 = threefry(kd[:, :1], kd[:, 1:], c1[None], c2[None], use_rolled_loops=False)
    one = np.array(1.0, np.float32).view(np.uint32)  # uniform: 23 random mantissa bits in [1, 2)
    floats = jax.lax.bitcast_convert_type(((b1 ^ b2) >> np.uint32(9)) | one, jnp.float32) - 1.0
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    u = jnp.maximum(tiny, floats * (jnp.float32(1.0) - tiny) + tiny)  # in [tiny, 1)
    return -jnp.log(-jnp.log(u))


try:  # jax internals behind `gumbel_rows`' fast path (see there)
    from jax._src.random import prng as _prng
    from jax._src.random import threefry2x32 as _tf

    _threefry = (_tf._threefry2x32_lowering, _prng.iota_2x32_shape)
except (ImportError, AttributeError):  # pragma: no cover - other jax versions
    _threefry = None


def _gumbel_argmax(keys_b, z_bv):
    """One draw per row from softmax(z) (Gumbel-max), row b from its own key."""
    return argmax_last(z_bv + gumbel_rows(keys_b, z_bv.shape[-1]))


def sample_logits(logits_bv, keys_b, temperature, top_p, *, top_k: int, use_top_p: bool):
    """One token per row from float32 logits [B, V]: (tokens [B] int32, log_probs [B] float32).

    log_probs are under softmax(logits / temperature) over the full vocabulary (see the package
    docstring); the draw itself is from the top-k / top-p truncation of it.
    """
    z_bv = logits_bv.astype(jnp.float32) / temperature
    logp_bv = jax.nn.log_softmax(z_bv, axis=-1)
    v = z_bv.shape[-1]
    if top_k > 0 or use_top_p:
        k = top_k if 0 < top_k < v else v
        vals_bk, idx_bk = jax.lax.top_k(z_bv, k)  # descending
        if use_top_p:
            p_bk = jax.nn.softmax(vals_bk, axis=-1)
            mass_before_bk = jnp.cumsum(p_bk, axis=-1) - p_bk
            vals_bk = jnp.where(mass_before_bk < top_p, vals_bk, -jnp.inf)  # rank 0 always kept
        j_b = _gumbel_argmax(keys_b, vals_bk)
        tokens_b = jnp.take_along_axis(idx_bk, j_b[:, None], axis=-1)[:, 0]
    else:
        tokens_b = _gumbel_argmax(keys_b, z_bv)
    log_probs_b = jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]
    return tokens_b.astype(jnp.int32), log_probs_b


def row_keys(rng, rows_b):
    """Each response row's own key, `fold_in(rng, row)` ([B] keys from global row ids [B])."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, rows_b)


def sample_step(logits_bv, keys_b, steps_b, temperature, top_p, *, greedy, top_k, use_top_p):
    """The token each row emits at response index `steps_b` ([B], or a scalar) and its log-prob.

    Row b draws with `fold_in(keys_b[b], steps_b[b])` (keys_b from `row_keys`), so its output
    depends only on (rng, its row id, its step): not on the batch, the slot or when it was
    admitted. Greedy takes the argmax and reports the log-prob at tau = temperature (1 if <= 0).
    """
    if greedy:
        tau = jnp.where(temperature > 0, temperature, 1.0)
        logp_bv = jax.nn.log_softmax(logits_bv / tau, axis=-1)
        tok_b = argmax_last(logits_bv)
        return tok_b, jnp.take_along_axis(logp_bv, tok_b[:, None], axis=-1)[:, 0]
    steps_b = jnp.broadcast_to(steps_b, keys_b.shape)
    keys_b = jax.vmap(jax.random.fold_in)(keys_b, steps_b)
    return sample_logits(logits_bv, keys_b, temperature, top_p, top_k=top_k, use_top_p=use_top_p)


def is_eos(tok, eos_ids: tuple[int, ...]):
    """Elementwise: tok is one of the (static) EOS ids."""
    if len(eos_ids) > 8:  # one compare per id would unroll into a long chain
        return jnp.isin(tok, jnp.asarray(eos_ids, jnp.int32))
    hit = jnp.zeros(tok.shape, jnp.bool_)
    for e in eos_ids:
        hit = hit | (tok == e)
    return hit


def normalize_eos(eos_token_id) -> tuple[int, ...]:
    """None / int / list of ids -> a sorted tuple (a static, hashable configuration)."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int | np.integer):
        return (int(eos_token_id),)
    return tuple(sorted({int(e) for e in eos_token_id}))


class StaticGraph:
    """A graphdef as a static `jax.jit` argument. Hashing an `nnx.GraphDef` walks every node, and
    jit hashes its static arguments on every call: this hashes once (per `rollout.Sampler`);
    equal graphdefs still share compiled programs."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (
            isinstance(other, StaticGraph)
            and self._hash == other._hash
            and self.graphdef == other.graphdef
        )


def as_key(rng):
    """One typed PRNG key from what users pass as `rng`: a typed key (`jax.random.key(seed)`, any
    impl, e.g. `impl="rbg"`) as it is; a raw uint32[2] (`jax.random.PRNGKey(seed)`) as the
    threefry key with that data (so PRNGKey(s) and key(s) sample the same rows); a raw uint32[4]
    as the default impl's key when that impl is rbg / unsafe_rbg. Shapes and dtypes only."""
    dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(f"generate: rng must be one key, got a key array of shape {shape}")
        return rng
    default = jax.config.jax_default_prng_impl
    if dtype == np.uint32 and shape == (2,):
        return jax.random.wrap_key_data(rng, impl="threefry2x32")
    if dtype == np.uint32 and shape == (4,) and default in ("rbg", "unsafe_rbg"):
        return jax.random.wrap_key_data(rng, impl=default)
    what = f"an array {dtype}{list(shape)}" if dtype is not None else type(rng).__name__
    raise ValueError(
        f"generate: rng must be a PRNG key: jax.random.key(seed) (any impl), or raw uint32[2] "
        f"key data (jax.random.PRNGKey(seed), read as threefry); got {what} (other impls' raw "
        "data: jax.random.wrap_key_data(data, impl=...))"
    )


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def check_prompts(prompt_ids, prompt_mask, vocab_size: int | None):
    """[B, P] integer ids and a [B, P] mask, a real token in every row, ids in [0, vocab) at
    the real tokens (host numpy). Returns the real lengths [B]."""
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    for name, x in (("prompt_ids", ids), ("prompt_mask", mask)):
        if x.ndim != 2:
            raise ValueError(f"generate: {name} must be [B, P] (left padded), got shape {x.shape}")
    if ids.shape != mask.shape:
        raise ValueError(f"generate: prompt_ids {ids.shape} and prompt_mask {mask.shape} differ")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"generate: prompt_ids must be integer token ids, got {ids.dtype}")
    mask = mask.astype(bool)
    if not mask.any(-1).all():
        raise ValueError("generate: every prompt row needs at least one token (mask all zero)")
    real = ids[mask]
    if real.min() < 0 or (vocab_size is not None and real.max() >= vocab_size):
        raise ValueError(
            f"generate: prompt_ids must be in [0, vocab_size={vocab_size}) at real tokens, got "
            f"ids from {real.min()} to {real.max()}"
        )
    return mask.sum(-1)


def cap_new_tokens(max_new_tokens: int, prompt_lens, positions: int | None) -> int:
    """max_new_tokens, at most the model's positions minus the longest prompt (a warning when
    it cuts); a prompt that leaves no room is a ValueError."""
    longest = int(np.max(prompt_lens))
    if positions is None:
        return max_new_tokens
    room = int(positions) - longest
    if room < 1:
        raise ValueError(
            f"generate: prompt_ids: the longest prompt has {longest} tokens and the model "
            f"max_position_embeddings={positions}: no room for a response"
        )
    if max_new_tokens > room:
        warnings.warn(
            f"generate: max_new_tokens={max_new_tokens} capped at {room}: the model's "
            f"max_position_embeddings={positions} minus the longest prompt ({longest} tokens)",
            stacklevel=4,
        )
        return room
    return max_new_tokens


def check_args(prompt_ids, prompt_mask, *, model_cfg, max_new_tokens, rng, n, temperature, top_p,
               top_k, greedy, eos_token_id, cache_dtype, model_dtype) -> dict:  # fmt: skip
    """Validates `generate`'s arguments on host values and static shapes (ValueError naming the
    argument). Returns the samplers' normalized keywords: greedy also when temperature <= 0,
    `rng` a typed key (`as_key`; a fixed one when greedy without rng), max_new_tokens capped
    by the positions (`cap_new_tokens`), eos ids a sorted tuple, cache_dtype a float dtype."""
    for name, v, lo in (("max_new_tokens", max_new_tokens, 1), ("n", n, 1), ("top_k", top_k, -1)):
        if not _is_int(v) or v < lo:
            raise ValueError(f"generate: {name} must be an int >= {lo}, got {v!r}")
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"generate: temperature must be a number, got {temperature!r}") from None
    if not math.isfinite(temperature):
        raise ValueError(f"generate: temperature must be finite (<= 0: greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    greedy = bool(greedy or temperature <= 0)
    if rng is None and not greedy:
        raise ValueError("generate: sampling needs rng=jax.random.key(...)")
    rng = jax.random.key(0) if rng is None else as_key(rng)
    try:
        cache_dtype = jnp.dtype(model_dtype if cache_dtype is None else cache_dtype)
    except TypeError:
        raise ValueError(f"generate: cache_dtype is not a dtype: {cache_dtype!r}") from None
    if not jnp.issubdtype(cache_dtype, jnp.floating):
        raise ValueError(f"generate: cache_dtype must be a float dtype, got {cache_dtype}")
    lens = check_prompts(prompt_ids, prompt_mask, getattr(model_cfg, "vocab_size", None))
    positions = getattr(model_cfg, "max_position_embeddings", None)
    return dict(
        max_new_tokens=cap_new_tokens(int(max_new_tokens), lens, positions), rng=rng, n=int(n),
        temperature=temperature, top_p=float(top_p), top_k=int(top_k), greedy=greedy,
        eos=normalize_eos(eos_token_id), cache_dtype=cache_dtype,
    )  # fmt: skip
