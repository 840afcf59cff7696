"""The static sampler: one jitted program, prefill once, then a `lax.while_loop` of decode steps
over a dense [B, P + N] KV cache. Kept as the simple reference for the paged engine (`engine.py`):
same outputs for the same rng (tests compare them), and selectable with `engine="static"`.

Every row decodes until the longest one ends; the cache is allocated for P + N slots per row
whatever the responses' lengths. `generate_program` is one module-level `jax.jit` whose static
arguments are the graphdef (`sampling.StaticGraph`) and the configuration (n, max_new_tokens,
greedy, top_k, whether top_p is on, EOS ids, pad id, cache dtype): jax's own cache keeps one
program per (graphdef, configuration, shape bucket); rows and prompt length are bucketed
(`batch_bucket`, `length_bucket`).

Sharding: under `jax.set_mesh(mesh)` (parameters placed by `sharding.shard_model`) the batch and
the cache batch follow `act_batch` / `cache_batch` (mesh `data` x `fsdp`) and the kv heads
`tensor`; the rows are rounded up to a multiple of the batch shards.
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
from htpo_jax.models.decoder import CACHE_LOGICAL_AXES, KVCache, positions_from_mask
from htpo_jax.rollout import sampling
from htpo_jax.rollout.sampling import Rollout, bucket, is_eos, prompt_bucket


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LoopState:
    """Decode-loop carry. tokens[:, :step] are written; the token at step - 1 is fed next."""

    step: jax.Array  # scalar int32
    tokens: jax.Array  # [B, N] int32
    log_probs: jax.Array  # [B, N] float32
    done: jax.Array  # [B] bool: EOS already sampled
    cache: KVCache | tuple  # k, v [L, B, S = P + N, K, H]; unrolled: per layer [B, S, K, H]


def _constrain_cache(cache):
    """A stacked `KVCache` [L, ...] or a tuple of per-layer ones [B, S, K, H]."""
    if isinstance(cache, tuple):
        return tuple(_constrain_cache_axes(c, CACHE_LOGICAL_AXES[1:]) for c in cache)
    return _constrain_cache_axes(cache, CACHE_LOGICAL_AXES)


def _constrain_cache_axes(cache: KVCache, axes) -> KVCache:
    return KVCache(k=constrain(cache.k, axes), v=constrain(cache.v, axes))


def _program(graphdef, n, max_new_tokens, greedy, top_k, use_top_p, eos_ids, pad_id, cache_dtype,
             unroll):  # fmt: skip
    """The generate program of one static configuration, as a function to trace. `unroll` (on
    CPU): the decode loop runs the layers unrolled over per-layer weights and caches (XLA:CPU
    copies a slice of a stacked array on every use inside a loop; see docs/ROLLOUT.md)."""
    n_new = max_new_tokens

    def run(state, prompt_ids_bp, prompt_mask_bp, rng, temperature, top_p):
        model = nnx.merge(graphdef, state)
        n_prompts, p = prompt_ids_bp.shape
        b = n_prompts * n  # response rows: prompt i's samples are rows i*n .. i*n+n-1
        prompt_ids_bp = constrain(prompt_ids_bp, ("act_batch", None))
        prompt_mask_bp = constrain(prompt_mask_bp.astype(jnp.bool_), ("act_batch", None))
        keys_b = sampling.row_keys(rng, jnp.arange(b))

        def sample(logits_bv, step):
            return sampling.sample_step(
                logits_bv, keys_b, step, temperature, top_p,
                greedy=greedy, top_k=top_k, use_top_p=use_top_p,
            )  # fmt: skip

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
        layer_states = model.layer_states() if unroll else None
        if unroll:
            cache = tuple(KVCache(k=cache.k[i], v=cache.v[i]) for i in range(cache.k.shape[0]))
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
            done=is_eos(tok_b, eos_ids),
            cache=cache,
        )

        def cond(s: _LoopState):
            return (s.step < n_new) & ~jnp.all(s.done)

        def body(s: _LoopState):
            prev_b1 = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B, 1]
            positions_b1 = (prompt_len_b + s.step - 1)[:, None]
            hidden_b1d, cache = model.forward_cached(
                prev_b1, positions_b1, s.cache, p + s.step - 1, kv_mask_bs, layer_states
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
                done=s.done | is_eos(tok_b, eos_ids),
                cache=_constrain_cache(cache),
            )

        final = jax.lax.while_loop(cond, body, state0)
        eos_bn = is_eos(final.tokens, eos_ids)
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

    return run


@functools.partial(jax.jit, static_argnums=(0, 1))
def generate_program(graph: sampling.StaticGraph, static: tuple, state, prompt_ids, prompt_mask,
                     rng, temperature, top_p) -> Rollout:  # fmt: skip
    """The static sampler's one program: `static` is `_program`'s configuration after the
    graphdef; `state` the parameters (traced: new values never recompile)."""
    return _program(graph.graphdef, *static)(
        state, prompt_ids, prompt_mask, rng, temperature, top_p
    )


def _batch_shards() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    sizes = dict(mesh.shape)
    return int(sizes.get("data", 1) * sizes.get("fsdp", 1))


def sample(sampler, params, prompt_ids, prompt_mask, *, max_new_tokens: int, rng, n: int,
           temperature, top_p, top_k: int, greedy: bool, eos: tuple[int, ...],
           pad_token_id: int, cache_dtype=None, batch_bucket=bucket,
           length_bucket=prompt_bucket) -> Rollout:  # fmt: skip
    """`rollout.Sampler`'s call on the static sampler (arguments checked by
    `sampling.check_args`). `batch_bucket` / `length_bucket` map the rows (B * n) and P to the
    compiled shapes (`lambda x: x` turns bucketing off). Each prompt is prefilled once and its
    cache copied to its n rows. Returns a `Rollout` of B * n rows.
    """
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    prompts, p = ids.shape
    # Rows (prompts * n) are bucketed, then rounded up to whole prompt groups that the batch
    # shards divide; extra prompts copy prompt 0 and their rows are sliced off below.
    step = math.lcm(n, _batch_shards())
    prompts_pad = math.ceil(batch_bucket(prompts * n) / step) * step // n
    p_pad = length_bucket(p)
    ids = np.pad(ids, ((0, 0), (p_pad - p, 0)), constant_values=pad_token_id)  # left padding
    mask = np.pad(mask.astype(np.int32), ((0, 0), (p_pad - p, 0)))
    ids = np.concatenate([ids, np.repeat(ids[:1], prompts_pad - prompts, 0)]).astype(np.int32)
    mask = np.concatenate([mask, np.repeat(mask[:1], prompts_pad - prompts, 0)])

    cache_dtype = jnp.dtype(sampler.dtype if cache_dtype is None else cache_dtype)
    static = (int(n), int(max_new_tokens), greedy, int(top_k), top_p < 1.0, eos,
              int(pad_token_id), cache_dtype, jax.default_backend() == "cpu")  # fmt: skip
    out = generate_program(sampler.graph, static, params, ids, mask, rng, jnp.float32(temperature),
                           jnp.float32(top_p))  # fmt: skip
    if prompts_pad == prompts:
        return out
    return jax.tree.map(lambda x: x[: prompts * n], out)
