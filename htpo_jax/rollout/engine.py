"""The rollout engine: continuous batching over a paged KV cache (the default behind `generate`).

Two compiled programs, driven by the host loop in `generate_paged`:

- prefill(pool, prompts [Bp, Tp]): runs the newly admitted prompts (all tokens but the last,
  right padded) through the model once and writes their keys / values into their pages;
- decode(pool, packed rows [S]): copies the copy-on-write pages, then a `lax.while_loop` of up to
  `steps_per_call` (K) decode steps: feed each row's token, write its k/v into its page, attend
  over the row's pages only (`paged_attention`), sample, stop rows at EOS / max_new_tokens. It
  returns the sampled tokens and log-probs [S, K]; the loop ends early when every row is done.

Between calls the host (`scheduler.Scheduler`) takes the tokens, ends finished rows (their pages
return to the pool), admits waiting rows into the free slots (prefill), grows the live rows' pages
for the next K steps and packs the live rows into the smallest batch bucket S that holds them
(compaction: a long tail of a few rows runs at the cost of a few rows). Programs are compiled per
bucket: S (powers of two from `min_slots` up to max_num_seqs), the pages read per row Pb (powers of
two: attention reads the longest live row's pages, not max_new_tokens'), and for prefill the
prompt count and length buckets; never per step.

The pool (one [num_pages, page_size, 2K, H] array per layer, see paged_attention.py) is donated
into every program and returned, so it is updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.infra.distributed import HostSync, needs_sync, put_global
from htpo_jax.infra.sharding import without_axes
from htpo_jax.models.attention import attend_in_query_chunks
from htpo_jax.rollout import paged_attention as pa
from htpo_jax.rollout import sampling, scheduler
from htpo_jax.rollout.sampling import Rollout
from htpo_jax.rollout.scheduler import Scheduler, steal_work


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's sizes; 0 means "from the memory budget" (see `resolve_sizes`)."""

    max_num_seqs: int = 0  # rows decoding at once (0: min(rows, 512))
    page_size: int = 16  # tokens per page
    num_pages: int = 0  # pages in the pool (0: what the call can use, within the budget)
    kv_memory_fraction: float = 0.5  # pool budget: this share of the device's memory
    cpu_kv_budget_gib: float = 2.0  # and on CPU (host RAM) never more than this
    steps_per_call: int = 16  # decode steps per host round-trip (K)
    work_stealing: bool = True  # batch shards take waiting rows from each other (scheduler.py)
    min_slots: int = 1  # smallest compiled batch (a long tail of 1-2 rows runs at their cost)
    attention: str = "auto"  # "auto" (TPU kernel on TPU), "reference", "tpu"
    # Reference decode: layers unrolled over per-layer arrays (True), scanned over stacked ones
    # (False); None: by backend and memory (`unroll_layers`).
    unroll_layers: bool | None = None
    # Reference decode: the windows gathered once per call (a copy of S x Pb pages) may take this
    # share of the pool's budget; larger ones are gathered a layer at a time in every step.
    window_memory_fraction: float = 0.25


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
    """The prefill program's static configuration (hashable: a `jax.jit` static argument)."""

    page_size: int  # tokens per page
    chunk_size: int  # query chunk of the prompts' attention (`attend_in_query_chunks`)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The decode program's static configuration (hashable: a `jax.jit` static argument): one
    compiled program per spec and shape bucket. Build it with `create`, which normalises the
    sampling arguments as `generate` receives them."""

    page_size: int  # tokens per page
    steps: int  # decode steps per call (K, `steps_per_call`)
    max_new_tokens: int  # a row stops after this many sampled tokens
    greedy: bool
    top_k: int  # 0: off
    use_top_p: bool  # nucleus filtering on (top_p < 1)
    eos: tuple  # token ids that end a row (`sampling.is_eos`)
    pad: int  # the token written for done rows
    impl: str  # paged attention: "tpu" (the kernel reads the pool) or "reference"
    unroll: bool = False  # reference: layers unrolled over per-layer arrays (`unroll_layers`)
    gather_once: bool = False  # reference: each row's pages gathered once per call (`windows`)

    @classmethod
    def create(cls, *, page_size: int, steps: int, max_new_tokens: int, greedy: bool, top_k,
               top_p: float, eos, pad, impl: str, unroll: bool,
               gather_once: bool = False) -> DecodeSpec:  # fmt: skip
        """The spec of a call: `unroll` and `gather_once` only off the kernel path."""
        return cls(page_size, steps, max_new_tokens, greedy, int(top_k), top_p < 1.0, eos,
                   int(pad), impl, impl != "tpu" and unroll,
                   impl != "tpu" and gather_once)  # fmt: skip

    def windows(self, gather_once: bool) -> DecodeSpec:
        """This spec with the reference decode's windows gathered once per call or not."""
        return dataclasses.replace(self, gather_once=self.impl != "tpu" and bool(gather_once))


# ---------------------------------------------------------------------- compiled programs
# Both programs run the model through `Decoder.forward_kv` with their own kv_fn(layer, q, k, v,
# kv_state); the pools are stacked over layers ([L, pages, ...]) like every decoder kv_state.
def _prefill_fn(graphdef, spec: PrefillSpec):
    page_size, chunk_size = spec.page_size, spec.chunk_size

    def run(state, pools, ids_bt, len_b, table_bp):
        model = nnx.merge(graphdef, state)
        b, t = ids_bt.shape
        pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        valid_bt = pos_bt < len_b[:, None]
        mask_bts = jnp.tril(jnp.ones((t, t), jnp.bool_))[None] & valid_bt[:, None, :]
        page_bt = jnp.take_along_axis(table_bp, pos_bt // page_size, axis=1)
        page_x = jnp.where(valid_bt, page_bt, 0).reshape(b * t)  # padding -> trash page
        off_x = (pos_bt % page_size).reshape(b * t)

        def kv_fn(layer, q, k, v, pools):
            kh = k.shape[2:]  # [B, T, K, H] -> [B * T, K, H] tokens
            pools = pa.write_kv(
                pools, layer, k.reshape(b * t, *kh), v.reshape(b * t, *kh), page_x, off_x
            )
            return attend_in_query_chunks(q, k, v, mask_bts, chunk_size), pools

        _, pools = model.forward_kv(ids_bt, pos_bt, pools, kv_fn)
        return pools

    return run


class _DecodeCarry(NamedTuple):
    """The decode while-loop's carry."""

    i: jax.Array  # decode steps taken in this call
    pools: tuple  # the page pool (every layer stacked)
    kv_len: jax.Array  # [S] cached tokens per row
    tok: jax.Array  # [S] the token fed next
    step: jax.Array  # [S] tokens sampled per row so far
    active: jax.Array  # [S] rows still decoding
    out_tok: jax.Array  # [S, K] this call's sampled tokens
    out_lp: jax.Array  # [S, K] and their log-probs
    recents: tuple  # reference: per-layer k / v of this call's tokens; TPU: ()


# Reference path (`spec.unroll`, see `unroll_layers`): with `spec.gather_once` (the host's choice:
# the windows fit the memory budget, see `plan_sizes`) each row's pages are gathered once per call
# into dense per-layer windows (`pa.gather_window`: gathering every step cost more than the
# attention on XLA:CPU), else one layer's at a time in every step; this call's new keys / values
# go to small per-layer [S, K, K_steps, H] buffers, written into the pages after the loop. The
# layers are unrolled over per-layer arrays (a loop copies each slice of a stacked array on every
# use: XLA:CPU always, and it measured 2x slower on a GPU), or scanned over stacked [L, ...]
# arrays when the per-layer weights would not fit (GPU). TPU path: the kernel reads only the pool,
# so each step writes its token there.
def _stack(items):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *items)


def _reference_buffers(spec: DecodeSpec, model_cfg, pools, table_sp, s: int):
    """(recents, windows) of the reference decode: zeroed per-layer buffers for this call's k / v
    and, with `gather_once`, each layer's gathered windows (else False); per-layer tuples when
    unrolled, stacked [L, ...] arrays when scanned."""
    n_layers, kh = model_cfg.num_layers, (model_cfg.num_kv_heads, model_cfg.head_dim)
    k_steps = spec.steps
    windows = spec.gather_once and [pa.gather_window(pools, j, table_sp) for j in range(n_layers)]
    recents = [  # per layer: keys [S, K, H, K_steps], values [S, K, K_steps, H]
        (jnp.zeros((s, kh[0], kh[1], k_steps), pools[0].dtype),
         jnp.zeros((s, kh[0], k_steps, kh[1]), pools[1].dtype))
    ] * n_layers  # fmt: skip
    if spec.unroll:
        return tuple(recents), windows
    return _stack(recents), windows and _stack(windows)


def _tpu_feed(model, spec: DecodeSpec, table_sp):
    """One step's model call on the kernel path: each row's k / v written into its page, the
    kernel attends over the pool. feed(carry) -> (hidden, pools, recents)."""
    page_size = spec.page_size

    def feed(c: _DecodeCarry):
        kv_len, active = c.kv_len, c.active
        col = jnp.take_along_axis(table_sp, (kv_len // page_size)[:, None], axis=1)[:, 0]
        page_s = jnp.where(active, col, 0)  # done rows write to the trash page
        off_s = kv_len % page_size

        def kv_fn(layer, q, k, v, pools):  # q [S, 1, N, H], k / v [S, 1, K, H]
            pools = pa.write_kv(pools, layer, k[:, 0], v[:, 0], page_s, off_s)
            out = pa.paged_attention_tpu(q[:, 0], pools, layer, table_sp, kv_len + 1)
            return out[:, None], pools  # [S, 1, N, H]

        hidden, pools = model.forward_kv(c.tok[:, None], kv_len[:, None], c.pools, kv_fn)
        return hidden, pools, c.recents

    return feed


def _reference_feed(model, spec: DecodeSpec, table_sp, kv0_s, windows, layer_states, recent_pos):
    """One step's model call on the reference path: the step's k / v go to the recents buffers
    at index i, attention over the row's window (gathered once, or now) and the recents.
    feed(carry) -> (hidden, pools, recents)."""
    unroll = spec.unroll

    def feed(c: _DecodeCarry):
        i, pools = c.i, c.pools

        def kv_fn(layer, q, k, v, recents):  # layer: a Python int when unrolled
            take = lambda xs: xs[layer] if unroll else jax.tree.map(lambda a: a[layer], xs)
            rk, rv = take(recents)  # this step's k / v [S, K, H] at recent index i
            rk = jax.lax.dynamic_update_slice(
                rk, k[:, 0, :, :, None].astype(rk.dtype), (0, 0, 0, i)
            )
            rv = jax.lax.dynamic_update_slice(
                rv, v[:, 0, :, None, :].astype(rv.dtype), (0, 0, i, 0)
            )
            window = take(windows) if windows else pa.gather_window(pools, layer, table_sp)
            out = pa.window_attention(q[:, 0], window, kv0_s, (rk, rv), recent_pos <= i)
            if unroll:
                recents = recents[:layer] + ((rk, rv),) + recents[layer + 1 :]
            else:
                new = (rk, rv)
                recents = tuple(r.at[layer].set(x) for r, x in zip(recents, new, strict=True))
            return out[:, None], recents

        hidden, recents = model.forward_kv(
            c.tok[:, None], c.kv_len[:, None], c.recents, kv_fn, layer_states
        )
        return hidden, pools, recents

    return feed


def _write_recents(spec: DecodeSpec, model_cfg, pools, table_sp, kv0_s, kv_len_end, recents,
                   recent_pos):  # fmt: skip
    """The reference decode's tokens of this call into their pages: row s fed
    kv_len_end - kv0 tokens, at positions kv0 onwards (the other buffer slots go to the trash
    page)."""
    n_layers, kh = model_cfg.num_layers, (model_cfg.num_kv_heads, model_cfg.head_dim)
    s, k_steps, page_size = kv0_s.shape[0], spec.steps, spec.page_size
    pos_sk = kv0_s[:, None] + recent_pos[None, :]  # [S, K_steps]
    fed_sk = pos_sk < kv_len_end[:, None]
    col_sk = jnp.minimum(pos_sk // page_size, table_sp.shape[1] - 1)
    page_sk = jnp.where(fed_sk, jnp.take_along_axis(table_sp, col_sk, axis=1), 0)
    page_x, off_x = page_sk.reshape(-1), (pos_sk % page_size).reshape(-1)
    layer_lx = jnp.arange(n_layers)[:, None]
    # keys [L, S, K, H, K_steps], values [L, S, K, K_steps, H]
    rk, rv = _stack(recents) if spec.unroll else recents
    rk, rv = (
        rk.transpose(0, 1, 4, 2, 3),
        rv.transpose(0, 1, 3, 2, 4),
    )  # [L, S, K_steps, K, H]
    rk, rv = (r.reshape(n_layers, s * k_steps, *kh) for r in (rk, rv))
    return pa.write_kv(pools, layer_lx, rk, rv, page_x[None], off_x[None])


def _decode_fn(graphdef, spec: DecodeSpec):
    k_steps, pad = spec.steps, spec.pad

    def run(state, pools, table_sp, kv_len_s, tok_s, step_s, row_s, active_s, src_s, dst_s,
            rng, temperature, top_p):  # fmt: skip
        state, layers = state  # layers: `split_layers`' per-layer weights (unroll), else None
        model = nnx.merge(graphdef, state)
        s = tok_s.shape[0]
        # Copy-on-write: newly admitted rows get their prompt's partial last page.
        pools = pa.copy_pages(pools, src_s, dst_s)
        keys_s = sampling.row_keys(rng, row_s)
        out_tok = jnp.full((s, k_steps), pad, jnp.int32)
        out_lp = jnp.zeros((s, k_steps), jnp.float32)
        kv0_s = kv_len_s  # cache length at the start of the call
        if spec.impl != "tpu":
            recents, windows = _reference_buffers(spec, model.cfg, pools, table_sp, s)
        else:
            recents = ()
        recent_pos = jnp.arange(k_steps)
        if spec.impl == "tpu":
            feed = _tpu_feed(model, spec, table_sp)
        else:
            layer_states = layers if spec.unroll else None
            feed = _reference_feed(model, spec, table_sp, kv0_s, windows, layer_states, recent_pos)

        def cond(c: _DecodeCarry):
            return (c.i < k_steps) & jnp.any(c.active)

        def body(c: _DecodeCarry):
            hidden, pools, recents = feed(c)
            active, step = c.active, c.step
            new, lp = sampling.sample_step(
                model.unembed(hidden[:, 0]), keys_s, step, temperature, top_p,
                greedy=spec.greedy, top_k=spec.top_k, use_top_p=spec.use_top_p,
            )  # fmt: skip
            new = jnp.where(active, new, pad)
            lp = jnp.where(active, lp, 0.0)
            out_tok = jax.lax.dynamic_update_slice_in_dim(c.out_tok, new[:, None], c.i, 1)  # [S, K]
            out_lp = jax.lax.dynamic_update_slice_in_dim(c.out_lp, lp[:, None], c.i, 1)
            done = sampling.is_eos(new, spec.eos) | (step + 1 >= spec.max_new_tokens)
            a = active.astype(jnp.int32)
            return _DecodeCarry(c.i + 1, pools, c.kv_len + a, jnp.where(active, new, c.tok),
                                step + a, active & ~done, out_tok, out_lp, recents)  # fmt: skip

        c = _DecodeCarry(jnp.int32(0), pools, kv_len_s, tok_s, step_s, active_s, out_tok, out_lp,
                         recents)  # fmt: skip
        c = jax.lax.while_loop(cond, body, c)
        pools = c.pools
        if spec.impl != "tpu":
            pools = _write_recents(spec, model.cfg, pools, table_sp, kv0_s, c.kv_len, c.recents,
                                   recent_pos)  # fmt: skip
        return pools, c.out_tok, c.out_lp

    return run


# The unrolled decode runs on per-layer copies of the stacked weights (`split_layers`, held for a
# `generate` call: a second copy of the weights): only when that fits this fraction of the
# device's free memory.
UNROLL_MEMORY_FRACTION = 0.25


def unroll_layers(weight_bytes: int = 0, free: int | None = None, *, backend: str | None = None,
                  override: bool | None = None) -> bool:  # fmt: skip
    """Whether the reference decode runs its layers unrolled on `backend` (None: the default
    backend); `override` (`EngineConfig.unroll_layers`), when not None, decides. Measured: on
    XLA:CPU a scanned loop copies each stacked slice on every use (docs/ROLLOUT.md); on an H200
    at the Qwen3-0.6B shape the unrolled decode ran 1.8-2.1x faster than the scanned one. On a
    GPU only when the weights (`weight_bytes`, compute dtype) fit UNROLL_MEMORY_FRACTION of
    `free`; never on TPU, where the kernel path decodes."""
    if override is not None:
        return override
    backend = backend or jax.default_backend()
    fits = free is None or weight_bytes <= UNROLL_MEMORY_FRACTION * free
    return backend == "cpu" or (backend == "gpu" and fits)


# The two programs: module-level `jax.jit`s whose static arguments are the graphdef
# (`sampling.StaticGraph`, hashed once per Sampler) and the program's configuration, so jax's own
# cache keeps one program per (graphdef, configuration, shape bucket). The pool is donated.
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def prefill_program(graph: sampling.StaticGraph, spec: PrefillSpec, state, pools, *args):
    """`_prefill_fn(graphdef, spec)` on (state, pools, ids_bt, len_b, table_bp)."""
    return _prefill_fn(graph.graphdef, spec)(state, pools, *args)


@functools.partial(jax.jit, static_argnums=0)
def split_layers(graph: sampling.StaticGraph, state) -> list:
    """The decoder's per-layer weights as arrays of their own (`Decoder.layer_states`): taken once
    per `generate` call for the unrolled decode (inside the decode program they were a copy of
    every weight in every call)."""
    return nnx.merge(graph.graphdef, state).layer_states()


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def decode_program(graph: sampling.StaticGraph, spec: DecodeSpec, state, pools, *args):
    """`_decode_fn(graphdef, spec)` on ((state, layers), pools, table_sp, ..., rng, temperature,
    top_p); layers: `split_layers(graph, state)` when `spec.unroll` is set, else None."""
    return _decode_fn(graph.graphdef, spec)(state, pools, *args)


# One engine per batch shard: the same programs under `shard_map` over the mesh's batch axes
# (data x fsdp; `tensor` stays automatic). Every per-row input, and the pool, has a leading shard
# axis [D, ...] split over those axes; the parameters and the sampling scalars are replicated.
# Each shard runs its own while loop (no collective inside), so shards may stop at other steps.
# decode's per-row args: table, kv_len, tok, step, row, active, copy src, copy dst (then rng,
# temperature, top_p, replicated)
_DECODE_ROW_ARGS = len(scheduler.DECODE_ARRAYS)


def _mapped(fn, mesh, n_sharded: int, n_out: int):
    """fn(state, pools, *args) per shard: the first `n_sharded` args and the pools carry a
    leading shard axis (split over the batch axes, size 1 inside), the rest are replicated."""
    axes = batch_axes(mesh)
    spec = jax.P(axes)
    # Manual over every axis when the others are trivial (size 1): a Pallas kernel (the TPU
    # paged attention) cannot sit in an automatically partitioned region, even a 1-wide one.
    others_trivial = all(size == 1 for name, size in mesh.shape.items() if name not in axes)
    manual = set(mesh.axis_names) if others_trivial else set(axes)

    def per_shard(state, pools, *args):
        local = [a[0] for a in args[:n_sharded]]
        out = fn(state, tuple(a[0] for a in pools), *local, *args[n_sharded:])
        if n_out == 1:
            return tuple(a[None] for a in out)
        return tuple(a[None] for a in out[0]), *(o[None] for o in out[1:])

    def run(state, pools, *args):
        pools_spec = (spec,) * len(pools)
        replicated = (jax.P(),) * (len(args) - n_sharded)
        in_specs = (jax.P(), pools_spec, *(spec,) * n_sharded, *replicated)
        out_specs = pools_spec if n_out == 1 else (pools_spec, *(spec,) * (n_out - 1))
        mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                               axis_names=manual, check_vma=False)  # fmt: skip
        return mapped(state, pools, *args)

    return run


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=4)
def prefill_program_sharded(graph: sampling.StaticGraph, spec: PrefillSpec, mesh, state, pools,
                            *args):  # fmt: skip
    """`prefill_program` for every batch shard of `mesh` (args [D, ...])."""
    return _mapped(_prefill_fn(graph.graphdef, spec), mesh, 3, 1)(state, pools, *args)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=4)
def decode_program_sharded(graph: sampling.StaticGraph, spec: DecodeSpec, mesh, state, pools,
                           *args):  # fmt: skip
    """`decode_program` for every batch shard of `mesh` (per-row args [D, S, ...])."""
    fn = _decode_fn(graph.graphdef, spec)
    pools, tok, lp = _mapped(fn, mesh, _DECODE_ROW_ARGS, 3)(state, pools, *args)
    # Every process reads every shard's tokens (each runs all shards' schedulers, in lockstep).
    everywhere = jax.NamedSharding(mesh, jax.P())
    return pools, *(jax.lax.with_sharding_constraint(x, everywhere) for x in (tok, lp))


def batch_axes(mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch (data x fsdp) and have more than one device."""
    sizes = dict(mesh.shape)
    return tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)


def batch_shards(mesh) -> int:
    """How many engines a call on `mesh` runs: the product of its `batch_axes`."""
    sizes = dict(mesh.shape)
    return int(np.prod([sizes[a] for a in batch_axes(mesh)], dtype=np.int64))


# ---------------------------------------------------------------------- sizes
def memory_bytes() -> tuple[int, int]:
    """(total, free) memory of this process's first device: its bytes_limit and bytes_limit -
    bytes_in_use where the backend reports them, else the host's RAM (CPU: MemTotal and
    MemAvailable)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        total = int(stats["bytes_limit"])
        return total, total - int(stats.get("bytes_in_use", 0))
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    page = os.sysconf("SC_PAGE_SIZE")
    total = info.get("MemTotal") or page * os.sysconf("SC_PHYS_PAGES")
    return total, info.get("MemAvailable") or page * os.sysconf("SC_AVPHYS_PAGES")


def free_memory_bytes() -> int:
    """Free memory of this process's first device (see `memory_bytes`)."""
    return memory_bytes()[1]


def kv_budget_bytes(cfg: EngineConfig, total: int, free: int, on_cpu: bool) -> int:
    """The most the page pool may take: `kv_memory_fraction` of the device's memory (and of what
    is free of it), on CPU never more than `cpu_kv_budget_gib`."""
    budget = cfg.kv_memory_fraction * min(total, max(free, 0))
    if on_cpu:
        budget = min(budget, cfg.cpu_kv_budget_gib * 2**30)
    return int(budget)


def pool_pages(cfg: EngineConfig, per_page: int, usable: int, row_pages: int, budget: int,
               free: int, where: str = "rollout engine") -> int:  # fmt: skip
    """The pool's pages (the trash page included): `cfg.num_pages` + 1 when set, else the
    `usable` pages the call can use rounded up to a power of two (calls with other row counts or
    lengths then reuse the compiled programs), within `budget` bytes. A pool that cannot hold one
    row at full length (`row_pages`) within the budget, or that exceeds `free` bytes, is a
    ValueError naming the keys to change, before anything is allocated."""
    gib = lambda pages: f"{pages * per_page / 2**30:.2f} GiB"
    if cfg.num_pages:
        pages = cfg.num_pages + 1
        if pages * per_page > free:
            raise ValueError(
                f"{where}: rollout.num_pages={cfg.num_pages} needs {gib(pages)} of KV cache, only "
                f"{free / 2**30:.2f} GiB is free; lower rollout.num_pages"
            )
        return pages
    if row_pages * per_page > min(budget, free):
        raise ValueError(
            f"{where}: one response at full length needs {gib(row_pages)} of KV cache "
            f"({row_pages} pages), over the pool's budget of {min(budget, free) / 2**30:.2f} "
            "GiB; lower rollout.max_response_length or raise rollout.kv_memory_fraction "
            "(rollout.cpu_kv_budget_gib on CPU)"
        )
    wanted = 1 << (usable - 1).bit_length()
    return max(min(wanted, budget // per_page), row_pages)


class Sizes(NamedTuple):
    """One engine's sizes, as `plan_sizes` decides them."""

    seqs: int  # max_num_seqs
    pages: int  # pool pages, the trash page included
    window_pages: int  # pages the once-per-call decode windows may copy
    unroll: bool  # the reference decode's layers unrolled (`unroll_layers`)


def plan_sizes(cfg: EngineConfig, model_cfg, prompt_lens, n, max_new_tokens, cache_dtype, *,
               total_bytes: int, free_bytes: int, backend: str, shards: int = 1,
               weight_bytes: int = 0, longest_prompt: int = 0,
               where: str = "rollout engine") -> Sizes:  # fmt: skip
    """The sizes of one engine (one batch shard's, whose prompts have lengths `prompt_lens`, out
    of `shards`) on a device of `backend` with `total_bytes` of memory, `free_bytes` of it free:
    a pure function (no memory reads, no collectives; `resolve_sizes` is the engine's caller).
    `longest_prompt` (0: max(prompt_lens)): the call's longest prompt, which any shard may be
    given (work stealing) and every shard's pool must hold at full length.

    max_num_seqs: `cfg.max_num_seqs` (the whole call's) split over the shards; 0: min(rows, 512).
    num_pages = 0: what the shard can use (max_num_seqs rows at full length, plus its prompts)
    rounded up to a power of two, within `kv_budget_bytes` (on CPU the shards share the host's
    RAM and its budget); see `pool_pages` (`where` names the caller in its errors).
    window_pages: how many pages the reference decode's once-per-call windows may copy
    (`cfg.window_memory_fraction` of the budget).
    unroll: `unroll_layers(weight_bytes, free_bytes)` on `backend` (`cfg.unroll_layers` decides
    when set).
    """
    ps = cfg.page_size
    c = model_cfg
    per_page = pa.page_bytes(c.num_layers, ps, c.num_kv_heads, c.head_dim, cache_dtype.itemsize)
    rows = len(prompt_lens) * n
    seqs = -(-cfg.max_num_seqs // shards) if cfg.max_num_seqs else min(rows, 512)
    longest = max(longest_prompt, *prompt_lens) - 1 + max_new_tokens
    on_cpu = backend == "cpu"
    host_shared = shards if on_cpu else 1
    budget = kv_budget_bytes(cfg, total_bytes, free_bytes, on_cpu) // host_shared
    window_pages = int(cfg.window_memory_fraction * budget) // per_page
    unroll = unroll_layers(weight_bytes, free_bytes, backend=backend, override=cfg.unroll_layers)
    # At most max_num_seqs rows hold pages at once (prompt pages are shared by n rows).
    row_pages = -(-longest // ps) + 1
    usable = (1 << (seqs - 1).bit_length()) * row_pages + sum(
        -(-(ln - 1) // ps) for ln in prompt_lens
    )
    pages = pool_pages(cfg, per_page, usable, row_pages, budget, free_bytes // host_shared, where)
    return Sizes(seqs, pages, window_pages, unroll)


def resolve_sizes(cfg: EngineConfig, model_cfg, prompt_lens, n, max_new_tokens, cache_dtype,
                  shards: int = 1, weight_bytes: int = 0, longest_prompt: int = 0,
                  sync: HostSync | None = None) -> Sizes:  # fmt: skip
    """`plan_sizes` on this process's device: its memory now (`memory_bytes`), under several
    processes the least of every process's (each must build the same pool: the same programs)."""
    total, free = memory_bytes()
    if jax.process_count() > 1:
        got = needs_sync(sync, "rollout engine").allgather_bytes(
            "rollout engine: pool size", f"{total} {free}".encode()
        )
        total, free = (min(int(x.split()[i]) for x in got) for i in (0, 1))
    return plan_sizes(cfg, model_cfg, prompt_lens, n, max_new_tokens, cache_dtype,
                      total_bytes=total, free_bytes=free, backend=jax.default_backend(),
                      shards=shards, weight_bytes=weight_bytes,
                      longest_prompt=longest_prompt)  # fmt: skip


# ---------------------------------------------------------------------- the host loop
def generate_paged(sampler, params, prompt_ids, prompt_mask, *, max_new_tokens, rng, n,
                   temperature, top_p, top_k, greedy, eos, pad_token_id, cache_dtype,
                   config: EngineConfig, stats: dict | None = None,
                   mesh=None) -> Rollout:  # fmt: skip
    """`rollout.Sampler`'s call on the engine (arguments checked by `sampling.check_args`).

    `mesh` (a concrete mesh whose batch axes split the batch): one engine per batch shard, each
    with its own scheduler and page pool, the prompts split into contiguous blocks over the
    shards, which then steal waiting rows from each other (`config.work_stealing`); None: one
    engine on the default device. `stats`, when given, receives the run's
    counters: rounds, preemptions, rows moved by work stealing, peak pages used, pool pages,
    page bytes, peak KV bytes.
    """
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
    prompts = [ids[i][mask[i]] for i in range(ids.shape[0])]
    cache_dtype = jnp.dtype(sampler.dtype if cache_dtype is None else cache_dtype)
    shards = batch_shards(mesh) if mesh is not None else 1
    bounds = np.linspace(0, len(prompts), shards + 1).astype(int)  # shard d: prompts [b_d, b_d+1)
    biggest = max(range(shards), key=lambda d: bounds[d + 1] - bounds[d])
    c = sampler.model_cfg
    lens = [len(p) for p in prompts]
    sizes = resolve_sizes(
        config, c, lens[bounds[biggest] : bounds[biggest + 1]], n, max_new_tokens, cache_dtype,
        shards, c.num_params() * jnp.dtype(sampler.dtype).itemsize, max(lens), sampler.sync,
    )  # fmt: skip
    ps, k_steps, seqs = config.page_size, config.steps_per_call, sizes.seqs
    blocks = [range(lo * n, hi * n) for lo, hi in itertools.pairwise(bounds)]  # rows by shard
    scheds = [Scheduler(prompts, n, max_new_tokens, page_size=ps, num_pages=sizes.pages,
                        max_num_seqs=seqs, steps_per_call=k_steps,
                        min_slots=min(config.min_slots, seqs),
                        rows=rows) for rows in blocks]  # fmt: skip
    impl = pa.resolve_impl(config.attention, c.head_dim)
    if impl == "tpu" and mesh is not None and dict(mesh.shape).get("tensor", 1) > 1:
        impl = "reference"  # the kernel is not partitioned over `tensor` (see docs/ROLLOUT.md)
    rows = len(prompts) * n
    out_tokens = np.full((rows, max_new_tokens), pad_token_id, np.int32)
    out_logp = np.zeros((rows, max_new_tokens), np.float32)
    spec = DecodeSpec.create(page_size=ps, steps=k_steps, max_new_tokens=max_new_tokens,
                             greedy=greedy, top_k=top_k, top_p=top_p, eos=eos,
                             pad=pad_token_id, impl=impl, unroll=sizes.unroll)  # fmt: skip
    scalars = (rng, jnp.float32(temperature), jnp.float32(top_p))
    progs = _Programs(sampler, PrefillSpec(ps, sampler.attention_chunk_size or 1024), spec, mesh)
    state = progs.compute_params(params)
    dstate = (state, split_layers(sampler.graph, state) if spec.unroll else None)
    pools = progs.init_pool(c.num_layers, sizes.pages, ps, c.num_kv_heads, c.head_dim,
                            cache_dtype, impl, shards)  # fmt: skip
    steal = config.work_stealing and shards > 1
    stolen = _run_rounds(progs, scheds, state, dstate, pools, scalars, sizes.window_pages, steal,
                         eos, out_tokens, out_logp)  # fmt: skip
    del pools, dstate
    if stats is not None:
        per_page = pa.page_bytes(c.num_layers, ps, c.num_kv_heads, c.head_dim, cache_dtype.itemsize)
        stats.update(_run_stats(scheds, stolen, sizes, per_page, shards))
    return progs.place(_finish(out_tokens, out_logp, eos))


def _run_rounds(progs: _Programs, scheds, state, dstate, pools, scalars, window_pages: int,
                steal: bool, eos, out_tokens, out_logp) -> int:  # fmt: skip
    """The host loop: rounds of (work stealing, admission, prefill, one decode call, commit)
    until every scheduler is done; the tokens land in out_tokens / out_logp. Returns the rows
    moved by work stealing."""
    stolen = 0
    while not all(s.done for s in scheds):
        if steal:
            stolen += steal_work(scheds)
        for s in scheds:
            s.advance()
        need = np.max([s.needs() for s in scheds], axis=0)
        plans = [s.pack(*need) for s in scheds]
        if need[2]:
            prefill = stack_plans([p for p, _ in plans])
            pools = progs.prefill(state, pools, *prefill)
        dec = [d for _, d in plans]
        per_row = stack_plans(dec)
        gather_once = bool(need[0] * need[1] <= window_pages)  # S x Pb pages
        pools, tok_dsk, lp_dsk = progs.decode(gather_once, dstate, pools, *per_row, *scalars)
        tok_dsk, lp_dsk = jax.device_get((tok_dsk, lp_dsk))
        for s, d, tok_sk, lp_sk in zip(scheds, dec, tok_dsk, lp_dsk, strict=True):
            s.commit(d, tok_sk, eos, out_tokens, out_logp, lp_sk)
            s.end_round()
    return stolen


def _run_stats(scheds, stolen: int, sizes: Sizes, per_page: int, shards: int) -> dict:
    """`generate_paged`'s `stats` counters of one call."""
    peak = max(s.alloc.peak_used for s in scheds)
    return dict(rounds=scheds[0].round, preemptions=sum(s.preemptions for s in scheds),
                stolen_rows=stolen,
                pool_pages=sizes.pages, peak_pages=peak, page_bytes=per_page,
                pool_bytes=sizes.pages * per_page * shards, max_num_seqs=sizes.seqs,
                shards=shards,
                peak_kv_bytes=sum(s.alloc.peak_used + 1 for s in scheds) * per_page,
                )  # fmt: skip


def stack_plans(plans) -> list[np.ndarray]:
    """The shards' plans (pytrees of one kind, `scheduler.PrefillPlan` / `DecodePlan`) as the
    programs' array arguments: each leaf stacked over the shards [D, ...], in leaf order."""
    return [np.stack(xs) for xs in zip(*(jax.tree.leaves(p) for p in plans), strict=True)]


class _Programs:
    """The engine's device side for one call: one engine on the default device (mesh None), or
    one per batch shard of `mesh` (`*_sharded` programs). Inputs come with a leading shard axis
    [D, ...] either way."""

    def __init__(self, sampler, prefill: PrefillSpec, decode: DecodeSpec, mesh):
        self.graph, self.dtype, self.mesh = sampler.graph, sampler.dtype, mesh
        self.prefill_spec, self.decode_spec = prefill, decode
        if mesh is not None:
            self.rows = jax.NamedSharding(mesh, jax.P(batch_axes(mesh)))

    def compute_params(self, params):
        """The parameters in the compute dtype, cast once per call (the programs would cast
        them every step); under a mesh replicated over the batch axes (each engine holds the
        whole model; `tensor` sharding is kept)."""
        if self.mesh is None:
            return _cast(params, self.dtype)
        drop, mesh = set(batch_axes(self.mesh)), self.mesh

        def replicated(a):  # over the batch axes
            spec = a.sharding.spec if isinstance(a.sharding, jax.NamedSharding) else jax.P()
            return jax.NamedSharding(mesh, without_axes(spec, drop))

        shardings = jax.tree.map(replicated, params)
        return jax.jit(_cast, static_argnums=1, out_shardings=shardings)(params, self.dtype)

    def init_pool(self, *args):
        if self.mesh is None:
            return _init_pool(*args[:-1])
        return jax.jit(_init_pool_sharded, static_argnums=tuple(range(8)),
                       out_shardings=self.rows)(*args)  # fmt: skip

    def prefill(self, state, pools, *args):
        if self.mesh is None:
            args = (a[0] for a in args)
            return prefill_program(self.graph, self.prefill_spec, state, pools, *args)
        args = (put_global(a, self.rows) for a in args)
        spec = self.prefill_spec
        return prefill_program_sharded(self.graph, spec, self.mesh, state, pools, *args)

    def decode(self, gather_once: bool, state, pools, *args):
        rows, scalars = args[:_DECODE_ROW_ARGS], args[_DECODE_ROW_ARGS:]
        spec = self.decode_spec.windows(gather_once)
        if self.mesh is None:
            pools, tok, lp = decode_program(self.graph, spec, state, pools,
                                            *(a[0] for a in rows), *scalars)  # fmt: skip
            return pools, tok[None], lp[None]
        rows = (put_global(a, self.rows) for a in rows)
        return decode_program_sharded(self.graph, spec, self.mesh, state, pools,
                                      *rows, *scalars)  # fmt: skip

    def place(self, rollout: Rollout) -> Rollout:
        """Under a mesh the outputs are split over the batch axes (when the rows divide)."""
        if self.mesh is None:
            return rollout
        rows = rollout.tokens.shape[0]
        where = (
            self.rows
            if rows % batch_shards(self.mesh) == 0
            else jax.NamedSharding(self.mesh, jax.P())
        )
        return jax.tree.map(lambda x: put_global(np.asarray(x), where), rollout)


def _cast(params, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def _init_pool_sharded(num_layers, num_pages, page_size, kv_heads, head_dim, dtype, impl, shards):
    pools = pa.init_pool(num_layers, num_pages, page_size, kv_heads, head_dim, dtype, impl)
    return tuple(jnp.broadcast_to(a, (shards, *a.shape)) for a in pools)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _init_pool(num_layers, num_pages, page_size, kv_heads, head_dim, dtype, impl):
    return pa.init_pool(num_layers, num_pages, page_size, kv_heads, head_dim, dtype, impl)


def _finish(tokens_bn: np.ndarray, logp_bn: np.ndarray, eos) -> Rollout:
    n_new = tokens_bn.shape[1]
    eos_bn = (
        np.isin(tokens_bn, np.asarray(eos, np.int32)) if eos else np.zeros_like(tokens_bn, bool)
    )
    finished = eos_bn.any(-1)
    lengths = np.where(finished, eos_bn.argmax(-1) + 1, n_new).astype(np.int32)
    response_mask = (np.arange(n_new)[None, :] < lengths[:, None]).astype(np.int32)
    return Rollout(
        tokens=jnp.asarray(tokens_bn),
        response_mask=jnp.asarray(response_mask),
        log_probs=jnp.asarray(logp_bn * response_mask),
        lengths=jnp.asarray(lengths),
        finished=jnp.asarray(finished),
    )
