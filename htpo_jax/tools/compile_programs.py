"""The jitted programs of one RL step, built from abstract arrays for `compile_check`.

`PROGRAMS` maps a name to a builder: a small function from the `Context` (config, mesh, abstract
model and training state, all `ShapeDtypeStruct`s with shardings) to the `Program`s to compile,
at the config's largest shapes. A new jitted program (e.g. a rollout engine's prefill and decode
steps) is one more builder. The model is built from its `config.json` by `nnx.eval_shape`, so no
weights are read or allocated.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from htpo_jax.run.config import Config

MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclasses.dataclass
class Program:
    """One jitted program to compile: `fn.lower(*args)`; `resident` = bytes per chip of state
    that lives outside its arguments while it runs (e.g. AdamW moments during the rollout)."""

    name: str
    shape: str
    fn: object
    args: tuple
    resident: int = 0
    note: str = ""
    mesh: object = None  # compile on this mesh instead of the run's (the engine: one chip)


@dataclasses.dataclass
class Context:
    """What every builder needs: config, mesh, abstract model / state, step config."""

    cfg: Config
    mesh: object
    graphdef: object
    params: object  # nnx.State of ShapeDtypeStructs with shardings
    opt_state: object
    tx: object
    step_cfg: object
    shards: int  # batch shards (data x fsdp)
    model_cfg: object
    hbm_bytes: int = 0  # per chip (sizes the engine's page pool)


# ---------------------------------------------------------------- model and state, abstract
def model_config_path(cfg: Config, override: str | None) -> Path:
    """config.json of the run's model: --model-config, model.path, or configs/models/<name>."""
    if override:
        p = Path(override)
        return p / "config.json" if p.is_dir() else p
    p = Path(cfg.model.path) / "config.json"
    if p.is_file():
        return p
    embedded = MODELS_DIR / Path(cfg.model.path).name / "config.json"
    if embedded.is_file():
        return embedded
    raise FileNotFoundError(
        f"no config.json for model.path={cfg.model.path!r}: not at {p} nor {embedded}; "
        f"pass --model-config PATH (embedded: {', '.join(sorted(embedded_models()))})"
    )


def embedded_models() -> list[str]:
    """The model names with a config.json under configs/models."""
    return [d.name for d in MODELS_DIR.iterdir() if (d / "config.json").is_file()]


def build_context(cfg: Config, mesh, model_cfg) -> Context:
    """The abstract model, parameters (sharded on `mesh` by the logical-axis rules), optimizer
    and its state for `cfg`: no weights are read or allocated (`hbm_bytes` is left 0)."""
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from htpo_jax.infra.sharding import variable_sharding
    from htpo_jax.models.decoder import Decoder
    from htpo_jax.rl.train_step import StepConfig, split_trainable
    from htpo_jax.run.adapters import attach_adapters
    from htpo_jax.run.policy import make_optimizer, model_kwargs

    def make():
        model = Decoder(model_cfg, **model_kwargs(cfg.model), rngs=nnx.Rngs(0))
        attach_adapters(model, cfg)  # model.lora: adapters, the base in model.lora.base_dtype
        return model

    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    params = jax.tree.map(
        lambda v: v.replace(
            jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=variable_sharding(v, mesh))
        ),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    tx, step_cfg = make_optimizer(cfg), StepConfig.from_config(cfg)
    trainable = split_trainable(params, step_cfg)[0]  # LoRA: AdamW state for the adapters only
    opt = jax.eval_shape(tx.init, trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        opt,
        shardings(trainable),
        transform_non_params=lambda _: replicated,
    )
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt, opt_sh)
    from htpo_jax.rollout.engine import batch_shards

    return Context(cfg, mesh, graphdef, params, opt, tx, step_cfg, batch_shards(mesh), model_cfg)


def shardings(tree):
    """The sharding of each array of an abstract tree."""
    import jax

    return jax.tree.map(lambda x: x.sharding, tree)


def per_chip_bytes(tree) -> int:
    """Bytes of one chip's shards of an abstract tree (the largest shard of each array)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape)) * x.dtype.itemsize
    return total


def array(ctx: Context, shape, dtype, lead: int = 0):
    """Abstract batch array: the axis after `lead` leading axes split over data x fsdp."""
    import jax

    from htpo_jax.infra.sharding import logical_sharding

    names = (None,) * lead + ("act_batch",) + (None,) * (len(shape) - lead - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=logical_sharding(names, ctx.mesh, shape))


def update_batch(ctx: Context, lead: tuple[int, ...], rows: int, prompt: int, width: int):
    """An abstract `UpdateBatch` of `rows` rows of (prompt + width) tokens behind `lead` axes."""
    import jax.numpy as jnp

    from htpo_jax.rl.train_step import UpdateBatch

    a = lambda shape, dt: array(ctx, lead + shape, dt, lead=len(lead))
    return UpdateBatch(
        input_ids=a((rows, prompt + width), jnp.int32),
        attention_mask=a((rows, prompt + width), jnp.int32),
        response_mask=a((rows, width), jnp.float32),
        old_log_prob=a((rows, width), jnp.float32),
        ref_log_prob=a((rows, width), jnp.float32),
        advantages=a((rows, width), jnp.float32),
        hard=a((rows,), jnp.bool_),
        correct=a((rows,), jnp.bool_),
        prompt_len=prompt,
    )


# ---------------------------------------------------------------- the programs of one step
def prompt_width(cfg: Config) -> int:
    """The widest prompt bucket: data.max_prompt_length padded as the data loader pads it."""
    from htpo_jax.rollout import prompt_bucket

    m = cfg.data.pad_to_multiple
    return prompt_bucket(math.ceil(cfg.data.max_prompt_length / m) * m)


def micro_shapes(ctx: Context) -> list[tuple[int, int]]:
    """(rows, response width) of the scoring / update micro-batches to check: the widest, and
    with token budgets also the one with the most rows (the log-prob head scales with rows)."""
    from htpo_jax.rl import packing

    c, p, r = ctx.cfg, prompt_width(ctx.cfg), ctx.cfg.rollout.max_response_length
    if not c.optim.max_tokens_per_micro:
        return [(c.optim.micro_batch_size, r)]
    ws = packing.widths(r, c.data.pad_to_multiple)
    rows = lambda w: packing.rows_for_width(p + w, c.optim.max_tokens_per_micro, ctx.shards)
    shapes = [(rows(ws[-1]), ws[-1])]
    if rows(ws[0]) != shapes[0][0]:
        shapes.append((rows(ws[0]), ws[0]))
    return shapes


def ref_bytes(ctx: Context) -> int:
    """Per-chip bytes of the reference model's weights (0 without the KL loss, and with LoRA:
    the reference is the base itself, the adapters switched off)."""
    return (
        per_chip_bytes(ctx.params) if ctx.cfg.algorithm.use_kl_loss and not ctx.step_cfg.lora else 0
    )


def trainable(ctx: Context):
    """The abstract parameters the optimizer updates (LoRA: the adapters)."""
    from htpo_jax.rl.train_step import split_trainable

    return split_trainable(ctx.params, ctx.step_cfg)[0]


def rollout_programs(ctx: Context) -> list[Program]:
    """The sampler's jitted generate (prefill + decode loop) at the largest sampler call."""
    import jax
    import jax.numpy as jnp

    from htpo_jax.rollout import sampling, static

    c = ctx.cfg
    r, n = c.rollout, c.rollout.n
    calls = [(c.data.gen_batch_size, n), (c.data.val_batch_size, r.val_n)]
    best = None
    for prompts, k in calls:
        if r.max_num_seqs:
            prompts = min(prompts, max(r.max_num_seqs // k, 1))
        step = math.lcm(k, ctx.shards)
        padded = math.ceil(sampling.bucket(prompts * k) / step) * step // k
        if best is None or padded * k > best[0] * best[1]:
            best = (padded, k)
    prompts, k = best
    p = prompt_width(c)
    eos = ctx.model_cfg.eos_token_id or (0,)
    config = (k, r.max_response_length, False, r.top_k, r.top_p < 1.0, eos, 0,
              jnp.dtype(c.model.dtype), ctx.mesh.devices.flat[0].platform == "cpu")  # fmt: skip
    fn = static.generate_program
    ids = array(ctx, (prompts, p), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    args = (sampling.StaticGraph(ctx.graphdef), config, ctx.params, ids, ids, key, f32, f32)
    shape = f"{prompts * k} rows x ({p}+{r.max_response_length})"
    note = "FLOPs count the decode loop body once"
    return [
        Program("rollout", shape, fn, args, per_chip_bytes(ctx.opt_state) + ref_bytes(ctx), note)
    ]


def old_log_prob_programs(ctx: Context) -> list[Program]:
    """The scoring program (`score_responses`) at each micro-batch shape of `micro_shapes`."""
    import functools

    import jax.numpy as jnp

    from htpo_jax.rl.train_step import score_responses

    p, t = prompt_width(ctx.cfg), ctx.step_cfg.temperature
    out = []
    for rows, w in micro_shapes(ctx):
        ids = array(ctx, (rows, p + w), jnp.int32)
        fn = functools.partial(score_responses.lower, ctx.graphdef)
        lowered = _Lowered(lambda *a, fn=fn, p=p: fn(a[0], a[1], a[2], p, t, 1024))
        resident = per_chip_bytes(ctx.opt_state) + ref_bytes(ctx)
        out.append(
            Program(
                "old_log_prob", f"{rows} x ({p}+{w})", lowered, (ctx.params, ids, ids), resident
            )
        )
    return out


def update_programs(ctx: Context) -> list[Program]:
    """The policy update as the trainer runs it (`stages.update_mini`): the micro-batch gradient
    at each `micro_shapes` shape (fixed-size micro-batches: one, at the full width), and the
    optimizer step."""
    import jax
    import jax.numpy as jnp

    from htpo_jax.rl.train_step import TrainState, jit_apply_grads, jit_micro_grads

    p = prompt_width(ctx.cfg)
    # The abstract state (TrainState.create would need concrete parameters): its shardings.
    state = TrainState(
        params=ctx.params,
        opt_state=ctx.opt_state,
        step=jax.ShapeDtypeStruct((), jnp.int32),
        rng=jax.eval_shape(lambda: jax.random.key(0)),
    )
    state_sh = shardings(state)
    out = []
    grads_fn = jit_micro_grads(ctx.graphdef, ctx.step_cfg, shardings(trainable(ctx)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    for rows, w in micro_shapes(ctx):
        micro = update_batch(ctx, (), rows, p, w)
        args = (trainable(ctx), ctx.params, micro, scalar, scalar)  # accumulator: trainable shapes
        resident = per_chip_bytes(ctx.opt_state) + ref_bytes(ctx)
        out.append(Program("update", f"{rows} x ({p}+{w})", grads_fn, args, resident))
    apply = jit_apply_grads(ctx.tx, state_sh, sc=ctx.step_cfg)
    args = (state, trainable(ctx), scalar)  # scalar: the mini-batch loss (non-finite check)
    out.append(Program("optimizer", "AdamW step", apply, args, ref_bytes(ctx)))
    return out


class _Lowered:
    """Adapter: a callable that lowers, for programs whose jit takes static arguments."""

    def __init__(self, lower):
        self.lower = lower


def engine_programs(ctx: Context) -> list[Program]:
    """The rollout engine's prefill and decode programs, one engine per batch shard as the run
    has them (`*_sharded`: shard_map over the mesh's data x fsdp axes; the weights replicated over
    those axes in the compute dtype, the training state resident beside them), TPU kernel path
    (ragged paged attention). Without batch shards: the single-engine programs on one chip.

    Rows per chip S = the decode bucket of ceil(rollout.max_num_seqs / batch shards); the pool
    holds `rollout.num_pages` pages, or as the engine sizes it (`engine_sizes`): S rows at full
    length plus the prompts, within kv_memory_fraction of the HBM left after the weights and the
    training state. The page-table width is the bucket of the longest row (prompt + response).
    """
    setup = _engine_setup(ctx)
    return [_engine_decode(ctx, setup), _engine_prefill(ctx, setup)]


def engine_sizes(ctx: Context, rows: int, weight_bytes: int, free: int):
    """`engine.plan_sizes` (the engine's own rule) for one batch shard's engine of `rows` rows
    (its max_num_seqs) and their `rows / n` prompts of the prompt width, on the target's HBM with
    `free` bytes left beside the engine's weights (`weight_bytes`) and the training state."""
    import jax.numpy as jnp

    from htpo_jax.rl.sample import engine_config
    from htpo_jax.rollout import engine

    c, r = ctx.cfg, ctx.cfg.rollout
    ecfg = dataclasses.replace(engine_config(r), max_num_seqs=rows * ctx.shards)
    return engine.plan_sizes(
        ecfg, ctx.model_cfg, [prompt_width(c)] * -(-rows // r.n), r.n, r.max_response_length,
        jnp.dtype(c.model.dtype), total_bytes=ctx.hbm_bytes, free_bytes=max(free, 0),
        backend=ctx.mesh.devices.flat[0].platform, shards=ctx.shards,
        weight_bytes=weight_bytes, where="compile_check: engine",
    )  # fmt: skip


@dataclasses.dataclass
class _EngineSetup:
    """What the engine's two programs share: mesh, weights, pool, sizes (`_engine_setup`)."""

    mesh: object  # the run's mesh, or one chip's without batch shards
    shards: int  # engines (batch shards)
    graph: object  # sampling.StaticGraph
    state: object  # the weights as the engine holds them
    pools: tuple
    rows: int  # S
    impl: str
    unroll: bool
    resident: int
    note: str
    shard: object  # shard(shape, dtype): an abstract per-shard array ([D, ...] when D > 1)


def _engine_setup(ctx: Context) -> _EngineSetup:
    """The engine's mesh, weights, sizes (`engine_sizes`) and abstract pool."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from htpo_jax.infra.sharding import make_mesh, without_axes
    from htpo_jax.rollout import engine, sampling
    from htpo_jax.rollout import paged_attention as pa
    from htpo_jax.rollout.scheduler import pow2_at_least

    c, r, m = ctx.cfg, ctx.cfg.rollout, ctx.model_cfg
    d = engine.batch_shards(ctx.mesh)
    mesh = ctx.mesh if d > 1 else make_mesh(1, 1, 1, devices=[ctx.mesh.devices.flat[0]])
    one = NamedSharding(mesh, PartitionSpec())
    dtype = jnp.dtype(c.model.dtype)
    cast = lambda x: dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    drop = set(engine.batch_axes(mesh))

    def replicated(x):  # the weights as the engine holds them: replicated over the batch axes
        spec = without_axes(x.sharding.spec, drop) if d > 1 else PartitionSpec()
        return jax.ShapeDtypeStruct(x.shape, cast(x), sharding=NamedSharding(mesh, spec))

    state = jax.tree.map(replicated, ctx.params)
    # Per-shard arrays get a leading [D] axis split over the batch axes (D = 1: none).
    rows_spec = NamedSharding(mesh, PartitionSpec(engine.batch_axes(mesh)))

    def shard(shape, dt):
        if d == 1:
            return jax.ShapeDtypeStruct(shape, dt, sharding=one)
        return jax.ShapeDtypeStruct((d, *shape), dt, sharding=rows_spec)

    ps = r.page_size
    rows = pow2_at_least(-(-(r.max_num_seqs or 512) // ctx.shards), 8)
    per_page = pa.page_bytes(m.num_layers, ps, m.num_kv_heads, m.head_dim, dtype.itemsize)
    resident = per_chip_bytes(ctx.opt_state) + per_chip_bytes(ctx.params) + ref_bytes(ctx)
    weights = per_chip_bytes(state)
    sizes = engine_sizes(ctx, rows, weights, ctx.hbm_bytes - resident - weights)
    pages = sizes.pages
    impl = pa.resolve_impl("auto", m.head_dim, ctx.mesh.devices.flat[0].platform)
    pools = jax.eval_shape(
        lambda: pa.init_pool(m.num_layers, pages, ps, m.num_kv_heads, m.head_dim, dtype, impl)
    )
    pools = tuple(shard(a.shape, a.dtype) for a in pools)
    where = "one chip" if d == 1 else f"per chip, {d} engines (one per batch shard)"
    note = f"{where}, {impl} attention, {pages} pages of {ps} ({pages * per_page / 2**30:.1f} GiB)"
    graph = sampling.StaticGraph(ctx.graphdef)
    return _EngineSetup(mesh, d, graph, state, pools, rows, impl, sizes.unroll, resident, note,
                        shard)  # fmt: skip


def _engine_decode(ctx: Context, e: _EngineSetup) -> Program:
    """The decode program at S rows x the longest row's pages, its windows gathered per step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from htpo_jax.rollout import engine
    from htpo_jax.rollout.scheduler import pow2_at_least

    c, r, m = ctx.cfg, ctx.cfg.rollout, ctx.model_cfg
    ps, k_steps, rows = r.page_size, r.steps_per_call, e.rows
    pb = pow2_at_least(-(-(prompt_width(c) - 1 + r.max_response_length) // ps) + 1)
    one = NamedSharding(e.mesh, PartitionSpec())
    spec = engine.DecodeSpec.create(
        page_size=ps, steps=k_steps, max_new_tokens=r.max_response_length, greedy=False,
        top_k=r.top_k, top_p=r.top_p, eos=tuple(np.atleast_1d(m.eos_token_id or 0).tolist()),
        pad=0, impl=e.impl, unroll=e.unroll,
    )  # fmt: skip
    vec = lambda n, dt=jnp.int32: e.shard((n,), dt)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=one)
    f32 = jax.ShapeDtypeStruct((), jnp.float32, sharding=one)
    lead = (e.graph, spec) if e.shards == 1 else (e.graph, spec, e.mesh)
    layers = jax.eval_shape(engine.split_layers, e.graph, e.state) if spec.unroll else None
    args = (*lead, (e.state, layers), e.pools, e.shard((rows, pb), jnp.int32), vec(rows),
            vec(rows), vec(rows), vec(rows), vec(rows, jnp.bool_), vec(rows), vec(rows), key, f32,
            f32)  # fmt: skip
    decode = engine.decode_program if e.shards == 1 else engine.decode_program_sharded
    return Program("engine_decode", f"{rows} rows x {pb} pages, {k_steps} steps", decode, args,
                   e.resident, e.note + "; FLOPs count the loop body once", e.mesh)  # fmt: skip


def _engine_prefill(ctx: Context, e: _EngineSetup) -> Program:
    """The prefill program at S / n prompts of the prompt width (less the last token)."""
    import jax.numpy as jnp

    from htpo_jax.rollout import engine
    from htpo_jax.rollout.scheduler import pow2_at_least

    c, ps = ctx.cfg, ctx.cfg.rollout.page_size
    bp = pow2_at_least(-(-e.rows // c.rollout.n))
    tp = -(-pow2_at_least(prompt_width(c) - 1, 16) // ps) * ps
    prefill = engine.prefill_program if e.shards == 1 else engine.prefill_program_sharded
    spec = engine.PrefillSpec(ps, c.model.attention_chunk_size or 1024)
    lead = (e.graph, spec) if e.shards == 1 else (e.graph, spec, e.mesh)
    args = (*lead, e.state, e.pools, e.shard((bp, tp), jnp.int32), e.shard((bp,), jnp.int32),
            e.shard((bp, tp // ps), jnp.int32))  # fmt: skip
    return Program("engine_prefill", f"{bp} prompts x {tp}", prefill, args, e.resident, e.note,
                   e.mesh)  # fmt: skip


PROGRAMS = {
    "rollout": rollout_programs,
    "engine": engine_programs,
    "old_log_prob": old_log_prob_programs,
    "update": update_programs,
}
