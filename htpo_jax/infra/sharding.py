"""Device mesh and the one table of logical-axis rules.

Parameters carry logical axis names in their `logical_axes` metadata (e.g. `('embed', 'heads',
'head_dim')` on the q projection); activations are constrained with `constrain(x, names)`. Only
this module knows mesh axes: `LOGICAL_AXIS_RULES` maps each logical name to a mesh axis (or a tuple
of them, or None = replicated). Mesh axes:

- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters and optimizer state sharded over the `embed` axis;
- `tensor`: tensor (Megatron-style) parallelism over heads, MLP width and vocabulary.

A dimension that the mesh axes do not divide (e.g. 2 kv heads on tensor=4) is replicated rather
than raising, so the same rules run any model on any mesh; `describe_shardings` shows the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis / tuple of mesh axes / None. Parameters use the short names;
# activations use `act_*` names so that e.g. the batch and the embedding of one activation never
# ask for the same mesh axis.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked layers' leading axis (scan_layers): never sharded
    ("lora_rank", None),  # a LoRA adapter's rank axis (models/lora.py): small, replicated
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # the unembedding in models/logprobs.py: vocabulary over every model-parallel axis, the
    # tokens of an fsdp group gathered (batch split over `data` only)
    ("unembed_vocab", ("tensor", "fsdp")),
    ("act_batch_data", "data"),
    # KV cache [L, B, S, K, H]
    ("cache_layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
    ("cache_kv_heads", "tensor"),
)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None
) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); one size may be -1 = all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{int(np.prod(sizes))} devices, have {len(devices)}"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    rules=LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec of mesh axes for an array whose dims have these logical names.

    With `shape` and `mesh`, mesh axes that do not divide a dim are dropped (that dim is then
    replicated over them), and a mesh axis is used by at most one dim (the first that asks).
    """
    table = dict(rules)
    sizes = dict(mesh.shape) if mesh is not None else {}
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        for ax in axes:
            if ax in used:
                continue
            if shape is not None and sizes:
                if shape[i] % (int(np.prod([sizes[a] for a in kept])) * sizes[ax]):
                    continue
            kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_sharding(logical_axes, mesh: Mesh, shape=None) -> NamedSharding:
    """NamedSharding on `mesh` for these logical axes (with `shape`, a mesh axis that does not
    divide its dim is left out)."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, shape, mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation; a no-op unless a mesh is set (`jax.set_mesh(mesh)`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh_spec(logical_axes, x.shape, mesh)
    manual = set(mesh.manual_axes)  # inside shard_map (the rollout engine's per-shard programs)
    if manual:
        spec = without_axes(spec, manual)
    return jax.lax.with_sharding_constraint(x, spec)


def without_axes(spec: PartitionSpec, drop: set[str]) -> PartitionSpec:
    """`spec` with the mesh axes in `drop` removed (the dims are replicated over them)."""

    def keep(entry):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(a for a in axes if a not in drop)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return PartitionSpec(*(keep(e) for e in spec))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """NamedSharding of an nnx.Variable by its `logical_axes` (replicated when it has none)."""
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return logical_sharding(axes, mesh, var.shape)


def state_shardings(state, mesh: Mesh):
    """Same tree as `state` (an `nnx.State` or module) with a NamedSharding per array."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    return jax.tree.map(lambda v: variable_sharding(v, mesh), state, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every array of `model` onto `mesh` by its logical axes (in place; returns model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    arrays = jax.tree.map(lambda v: v[...], state, is_leaf=_is_var)
    nnx.update(model, jax.device_put(arrays, shardings))
    return model


def describe_shardings(model: nnx.Module, mesh: Mesh) -> dict[str, str]:
    """'layers.self_attn.q_proj.kernel' -> 'P(None, fsdp, tensor, None)': for logs and tests."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        out[".".join(map(str, path))] = str(variable_sharding(var, mesh).spec)
    return out


def to_host(x):
    """A (possibly multi-host sharded) array tree as numpy on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return jax.tree.map(np.asarray, x)


def is_main_process() -> bool:
    """True on JAX process 0 (the one writer on a multi-host run)."""
    return jax.process_index() == 0
