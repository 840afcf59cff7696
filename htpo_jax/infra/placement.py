"""Where rollouts run (`rollout.placement`): on every device (colocated), or on their own devices
of every host (separate), and how the trainer's weights reach them.

`separate`: every host gives its first `rollout.devices_per_host` local devices to the rollout
and the rest to the trainer, so every host holds both meshes and all hosts still run one SPMD
program each (the rollout mesh's programs and the trainer mesh's programs never share a device).
The rollout mesh has one batch shard per device (`data` axis): one engine per device, each with
the whole model in the compute dtype, as the engine lays it out under any mesh.

`WeightSync` copies the trainer's parameters there after an update without gathering the model on
one chip: tensor by tensor, each is cast to the compute dtype and replicated over the trainer's
devices (one tensor at a time: the extra memory is the largest tensor), then every host copies it
from one of its own trainer devices to each of its own rollout devices (host-local transfers
only; no cross-host copy), and the copies form the rollout mesh's replicated array. (tunix
reshards with Pathways' experimental reshard where it has it, else with one `jax.device_put` of
the whole tree, which its own comment says all-gathers when the shardings do not map one to one;
here the gather is bounded to one tensor, with no Pathways needed.)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from htpo_jax.infra.sharding import make_mesh


class PlacementError(ValueError):
    """The devices cannot be split as `rollout.placement` / `rollout.devices_per_host` ask."""


def split_devices(devices_per_host: int) -> tuple[list, list]:
    """(trainer devices, rollout devices): of each process's local devices (in id order) the
    first `devices_per_host` (0: half) decode, the rest train; listed process by process."""
    by_proc: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_proc.setdefault(d.process_index, []).append(d)
    local = len(next(iter(by_proc.values())))
    k = devices_per_host or local // 2
    if not 0 < k < local:
        raise PlacementError(
            f"rollout.devices_per_host: each host has {local} devices; separate placement needs "
            f"1 .. {local - 1} of them for the rollout (0 = half), got {devices_per_host}"
        )
    trainer = [d for devs in by_proc.values() for d in devs[k:]]
    rollout = [d for devs in by_proc.values() for d in devs[:k]]
    return trainer, rollout


def meshes(cfg) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh | None]:
    """(trainer mesh, rollout mesh or None when colocated) of a run config: the trainer's mesh
    has the `mesh` section's sizes over its devices."""
    m = cfg.mesh
    if cfg.rollout.placement != "separate":
        return make_mesh(m.data, m.fsdp, m.tensor), None
    trainer, rollout = split_devices(cfg.rollout.devices_per_host)
    try:
        trainer_mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=trainer)
    except ValueError as e:
        raise PlacementError(f"mesh (over the {len(trainer)} trainer devices): {e}") from None
    return trainer_mesh, make_mesh(len(rollout), 1, 1, devices=rollout)


class WeightSync:
    """Copies parameters to the rollout mesh, replicated, in the compute `dtype` (module
    docstring); `stats` holds the last copy's seconds and bytes (`time/weight_sync`,
    `weight_sync/bytes`)."""

    def __init__(self, rollout_mesh: jax.sharding.Mesh, dtype):
        self.mesh, self.dtype = rollout_mesh, dtype
        self.target = jax.NamedSharding(rollout_mesh, jax.P())
        me = jax.process_index()
        self.local = [d for d in rollout_mesh.devices.flat if d.process_index == me]
        self.stats: dict = {}
        self._gather: dict = {}  # trainer mesh -> the jitted cast-and-replicate (one per mesh)

    def _cast(self, x):
        return x.astype(self.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def _leaf(self, x: jax.Array) -> jax.Array:
        mesh = x.sharding.mesh
        if mesh not in self._gather:  # replicated on the trainer mesh, in the compute dtype
            self._gather[mesh] = jax.jit(self._cast, out_shardings=jax.NamedSharding(mesh, jax.P()))
        full = self._gather[mesh](x)
        src = full.addressable_shards[0].data  # this host's copy, on one of its trainer devices
        parts = [jax.device_put(src, d) for d in self.local]
        return jax.make_array_from_single_device_arrays(full.shape, self.target, parts)

    def __call__(self, params):
        """`params` (on the trainer mesh) as replicated arrays of the rollout mesh."""
        t0 = time.perf_counter()
        out = jax.tree.map(self._leaf, params)
        jax.block_until_ready(out)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(out))
        self.stats = {"time/weight_sync": time.perf_counter() - t0, "weight_sync/bytes": nbytes}
        return out
