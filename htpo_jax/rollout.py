"""Rollouts: a jitted KV-cache sampler (prefill once, then a `lax.while_loop` of decode steps).

    rollout = generate(model, prompt_ids, prompt_mask, max_new_tokens=..., rng=key, n=16,
                       temperature=1.0, top_p=1.0, top_k=-1, eos_token_id=[...], pad_token_id=0)

Prompts are left padded ([B, P], mask 1 on real tokens; every row needs at least one). With
`n > 1` each prompt is sampled n times (rows `i*n .. i*n+n-1` belong to prompt i; the prompt is
prefilled once and its cache copied). The result, a `Rollout`, holds per response row:
`tokens [B, N]` (pad_token_id after the end), `response_mask [B, N]` (1 up to and including the
first EOS), `log_probs [B, N]`, `lengths [B]` and `finished [B]` (ended with EOS, i.e. not
truncated at N = max_new_tokens). docs/ROLLOUT.md has the details and the memory sizing.

The log-prob contract
---------------------
`log_probs[b, i] = log softmax(z / tau)[tokens[b, i]]`, z the float32 logits and tau the
temperature: the log-prob of the sampled token under the temperature-scaled FULL distribution,
NOT the top-p / top-k truncated one that the token was actually drawn from. That is exactly what
`models.logprobs.logprobs_and_entropy(model, ids, mask, temperature=tau)` computes for the same
sequence (prompt + response), so the trainer's old log-probs and these agree (float32: to ~1e-6;
a bf16 model differs by bf16 rounding between the cached and the full forward). Greedy decoding
(`greedy=True` or `temperature <= 0`) reports log-probs at tau = temperature, or at tau = 1 when
temperature <= 0. Zeros after the end.

Sampling order (as transformers and vLLM): temperature, then top-k, then top-p on the top-k
renormalized distribution: keep the fewest highest-probability tokens whose mass reaches top_p
(the token that crosses top_p is kept). Each row draws from its own key, `fold_in(fold_in(rng,
row), step)`: a row's randomness does not depend on the batch size, the bucket or other rows, and
the same `rng` gives the same output.

Compilation
-----------
One `jax.jit` per model object and static configuration (n, max_new_tokens, greedy, top_k,
whether top_p is on, EOS ids, pad id, cache dtype), cached in `_JITTED`; temperature and top_p are
traced scalars (changing them does not recompile). Shapes are bucketed: the rows (B * n) are
rounded up by `bucket` (extra prompts copy prompt 0 and their rows are sliced off) and the prompt
length by `prompt_bucket` (extra columns are left padding), so a run compiles once per bucket,
not once per batch. `trace_count()` counts traces (tests use it). Nothing is donated: the KV cache
is allocated inside the jitted function and the parameters are reused by the caller.

Sharding: under `jax.set_mesh(mesh)` (parameters placed by `sharding.shard_model`) the batch and
the cache batch follow `act_batch` / `cache_batch` (mesh `data` x `fsdp`) and the kv heads
`tensor`; the rows are rounded up to a multiple of the batch shards.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.models.decoder import CACHE_LOGICAL_AXES, KVCache, positions_from_mask
from htpo_jax.sharding import constrain

_TRACES = 0


def trace_count() -> int:
    """How many times a generate function has been traced (= compiled) in this process."""
    return _TRACES


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """B sampled responses of N = max_new_tokens slots each (B = prompts * n)."""

    tokens: jax.Array  # [B, N] int32, pad_token_id after the end
    response_mask: jax.Array  # [B, N] int32, 1 up to and including the first EOS
    log_probs: jax.Array  # [B, N] float32, log p_tau(token) (full distribution; 0 after the end)
    lengths: jax.Array  # [B] int32 = response_mask.sum(-1)
    finished: jax.Array  # [B] bool, the response ended with EOS (False: truncated at N)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LoopState:
    """Decode-loop carry. tokens[:, :step] are written; the token at step - 1 is fed next."""

    step: jax.Array  # scalar int32
    tokens: jax.Array  # [B, N] int32
    log_probs: jax.Array  # [B, N] float32
    done: jax.Array  # [B] bool: EOS already sampled
    cache: KVCache  # k, v [L, B, S = P + N, K, H]


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


def _gumbel_argmax(keys_b, z_bv):
    """One draw per row from softmax(z) (Gumbel-max), row b from its own key."""
    g_bv = jax.vmap(lambda k: jax.random.gumbel(k, z_bv.shape[-1:], jnp.float32))(keys_b)
    return argmax_last(z_bv + g_bv)


def sample_logits(logits_bv, keys_b, temperature, top_p, *, top_k: int, use_top_p: bool):
    """One token per row from float32 logits [B, V]: (tokens [B] int32, log_probs [B] float32).

    log_probs are under softmax(logits / temperature) over the full vocabulary (see the module
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


def _constrain_cache(cache: KVCache) -> KVCache:
    return KVCache(
        k=constrain(cache.k, CACHE_LOGICAL_AXES), v=constrain(cache.v, CACHE_LOGICAL_AXES)
    )


def _compiled(graphdef, n, max_new_tokens, greedy, top_k, use_top_p, eos_ids, pad_id, cache_dtype):
    """A new jitted generate for one static configuration (jax.jit then keeps a program per
    input shape); `_jitted` caches these per model object."""
    n_new = max_new_tokens

    def run(state, prompt_ids_bp, prompt_mask_bp, rng, temperature, top_p):
        global _TRACES
        _TRACES += 1  # Python side effect: runs only while tracing
        model = nnx.merge(graphdef, state)
        n_prompts, p = prompt_ids_bp.shape
        b = n_prompts * n  # response rows: prompt i's samples are rows i*n .. i*n+n-1
        prompt_ids_bp = constrain(prompt_ids_bp, ("act_batch", None))
        prompt_mask_bp = constrain(prompt_mask_bp.astype(jnp.bool_), ("act_batch", None))
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(b))

        def sample(logits_bv, step):
            if greedy:
                tau = jnp.where(temperature > 0, temperature, 1.0)
                logp_bv = jax.nn.log_softmax(logits_bv / tau, axis=-1)
                tok_b = argmax_last(logits_bv)
                return tok_b, jnp.take_along_axis(logp_bv, tok_b[:, None], axis=-1)[:, 0]
            keys_b = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
            return sample_logits(
                logits_bv, keys_b, temperature, top_p, top_k=top_k, use_top_p=use_top_p
            )

        def is_eos(tok):
            hit = jnp.zeros(tok.shape, jnp.bool_)
            for e in eos_ids:
                hit = hit | (tok == e)
            return hit

        # Prefill each distinct prompt once, into a P-slot cache (attention [P, P], not
        # [P, P + N]); then repeat it n times and append N empty slots: the full cache.
        prompt_cache = model.init_cache(n_prompts, p, cache_dtype)
        hidden_bpd, prompt_cache = model.forward_cached(
            prompt_ids_bp, positions_from_mask(prompt_mask_bp), prompt_cache, 0, prompt_mask_bp
        )

        def expand(x_lpkh):  # [L, B/n, P, K, H] -> [L, B, S = P + N, K, H]
            x_lpkh = jnp.repeat(x_lpkh, n, axis=1) if n > 1 else x_lpkh
            empty = jnp.zeros(x_lpkh.shape[:1] + (b, n_new) + x_lpkh.shape[3:], cache_dtype)
            return constrain(jnp.concatenate([x_lpkh, empty], axis=2), CACHE_LOGICAL_AXES)

        cache = KVCache(k=expand(prompt_cache.k), v=expand(prompt_cache.v))
        hidden_bd = jnp.repeat(hidden_bpd[:, -1], n, axis=0)  # [B, D]
        prompt_mask_bp = constrain(jnp.repeat(prompt_mask_bp, n, axis=0), ("act_batch", None))
        prompt_len_b = prompt_mask_bp.sum(-1, dtype=jnp.int32)
        # Decode masks: prompt padding stays masked; response slots are all real, and the
        # causal mask in forward_cached hides the ones not yet written.
        kv_mask_bs = jnp.concatenate([prompt_mask_bp, jnp.ones((b, n_new), jnp.bool_)], axis=1)

        tok_b, lp_b = sample(model.unembed(hidden_bd), 0)
        tokens = jnp.full((b, n_new), pad_id, jnp.int32).at[:, 0].set(tok_b)
        log_probs = jnp.zeros((b, n_new), jnp.float32).at[:, 0].set(lp_b)
        state0 = _LoopState(
            step=jnp.int32(1),
            tokens=constrain(tokens, ("act_batch", None)),
            log_probs=constrain(log_probs, ("act_batch", None)),
            done=is_eos(tok_b),
            cache=cache,
        )

        def cond(s: _LoopState):
            return (s.step < n_new) & ~jnp.all(s.done)

        def body(s: _LoopState):
            prev_b1 = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B, 1]
            positions_b1 = (prompt_len_b + s.step - 1)[:, None]
            hidden_b1d, cache = model.forward_cached(
                prev_b1, positions_b1, s.cache, p + s.step - 1, kv_mask_bs
            )
            tok_b, lp_b = sample(model.unembed(hidden_b1d[:, 0]), s.step)
            tok_b = jnp.where(s.done, pad_id, tok_b)
            lp_b = jnp.where(s.done, 0.0, lp_b)
            # [B, N] <- [B, 1] at column step
            tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok_b[:, None], s.step, 1)
            log_probs = jax.lax.dynamic_update_slice_in_dim(s.log_probs, lp_b[:, None], s.step, 1)
            return _LoopState(
                step=s.step + 1,
                tokens=tokens,
                log_probs=log_probs,
                done=s.done | is_eos(tok_b),
                cache=_constrain_cache(cache),
            )

        final = jax.lax.while_loop(cond, body, state0)
        eos_bn = is_eos(final.tokens)
        finished_b = eos_bn.any(-1)
        lengths_b = jnp.where(finished_b, jnp.argmax(eos_bn, axis=-1) + 1, n_new).astype(jnp.int32)
        response_mask = (jnp.arange(n_new)[None, :] < lengths_b[:, None]).astype(jnp.int32)
        return Rollout(
            tokens=final.tokens,
            response_mask=response_mask,
            log_probs=final.log_probs * response_mask,
            lengths=lengths_b,
            finished=finished_b,
        )

    return jax.jit(run)


# model -> (graphdef, {static configuration: jitted fn}). Keyed by the model object (weakly) so a
# call costs `nnx.state(model)` instead of `nnx.split` (a full graph walk) plus hashing a graphdef;
# the parameters may change between calls (training), the structure may not.
_JITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _jitted(model, static: tuple):
    entry = _JITTED.get(model)
    if entry is None:
        graphdef, state = nnx.split(model)
        entry = _JITTED[model] = (graphdef, {})
    else:
        state = nnx.state(model)
    graphdef, fns = entry
    if static not in fns:
        fns[static] = _compiled(graphdef, *static)
    return fns[static], state


def _batch_shards() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    sizes = dict(mesh.shape)
    return int(sizes.get("data", 1) * sizes.get("fsdp", 1))


def generate(
    model,
    prompt_ids,
    prompt_mask,
    *,
    max_new_tokens: int,
    rng=None,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    greedy: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    cache_dtype=None,
    batch_bucket=bucket,
    length_bucket=prompt_bucket,
) -> Rollout:
    """Samples `n` responses per left-padded prompt; see the module docstring.

    prompt_ids, prompt_mask: [B, P] (numpy or jax); rng: a PRNG key (ignored when greedy).
    `cache_dtype` defaults to the model's compute dtype. `batch_bucket` / `length_bucket` map
    the rows (B * n) and P to the compiled shapes (`lambda x: x` turns bucketing off). Each
    prompt is prefilled once and its cache copied to its n rows. Returns a `Rollout` of B * n
    rows.
    """
    greedy = bool(greedy or temperature <= 0)
    if rng is None:
        if not greedy:
            raise ValueError("generate: sampling needs rng=jax.random.key(...)")
        rng = jax.random.key(0)
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if eos_token_id is None:
        eos = ()
    elif isinstance(eos_token_id, int | np.integer):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(sorted({int(e) for e in eos_token_id}))

    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    prompts, p = ids.shape
    if not mask.astype(bool).any(-1).all():
        raise ValueError("generate: every prompt row needs at least one token (mask all zero)")
    # Rows (prompts * n) are bucketed, then rounded up to whole prompt groups that the batch
    # shards divide; extra prompts copy prompt 0 and their rows are sliced off below.
    step = math.lcm(n, _batch_shards())
    prompts_pad = math.ceil(batch_bucket(prompts * n) / step) * step // n
    p_pad = length_bucket(p)
    ids = np.pad(ids, ((0, 0), (p_pad - p, 0)), constant_values=pad_token_id)  # left padding
    mask = np.pad(mask.astype(np.int32), ((0, 0), (p_pad - p, 0)))
    ids = np.concatenate([ids, np.repeat(ids[:1], prompts_pad - prompts, 0)]).astype(np.int32)
    mask = np.concatenate([mask, np.repeat(mask[:1], prompts_pad - prompts, 0)])

    cache_dtype = jnp.dtype(model.dtype if cache_dtype is None else cache_dtype)
    static = (int(max_new_tokens), greedy, int(top_k), top_p < 1.0, eos, int(pad_token_id))
    fn, state = _jitted(model, (int(n),) + static + (cache_dtype,))
    out = fn(state, ids, mask, rng, jnp.float32(temperature), jnp.float32(top_p))
    if prompts_pad == prompts:
        return out
    return jax.tree.map(lambda x: x[: prompts * n], out)
