"""Multi-host runs: start-up, host sync points with a deadline, lockstep scoring, stop requests.

(Lockstep scoring is `rl/sample.score_lockstep`; the shared checkpoint-dir check
`run/checkpoint.check_shared_dir`.)

Every host runs the same program (JAX multi-controller). This module owns what keeps them in
step:

- `initialize`: `jax.distributed.initialize` from the `distributed:` config section, environment
  variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS),
  or cluster auto-detection (Cloud TPU, SLURM, Open MPI, Kubernetes).
- Host collectives (`HostSync`: `allgather_bytes`, `allgather_arrays`, `agree`, `barrier`) go
  through the coordination service's key-value store and barriers, never through the
  accelerators, and each waits at most its `timeout_s` (`trainer.collective_timeout_s`): a host
  that does not arrive turns into a `CollectiveTimeout` naming the stage and where every host
  was (the watchdog), not a silent hang. A `HostSync` owns its sequence numbers and timeout; the
  trainer builds one and hands it to every stage, the checkpoint check and the sampler.
- `StopSignals`: SIGTERM / SIGINT and JAX's preemption notices become one agreed stop at a step
  boundary (the trainer then saves and exits 0).
- `put_global`: host array -> global array without device_put's cross-host equality check.

With one process every collective is the identity and costs nothing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

_PREFIX = "htpo"


class CollectiveTimeout(RuntimeError):
    """A host sync point was not reached by every host in time (or the hosts disagreed)."""


class SetupError(RuntimeError):
    """A multi-host setup problem the user must fix (one line; the trainer exits 2)."""


# ---------------------------------------------------------------- start-up
def _env_says_multiprocess() -> str | None:
    """Name of the environment hint that asks for jax.distributed, or None."""
    if os.environ.get("HTPO_DISTRIBUTED") == "1":
        return "HTPO_DISTRIBUTED=1"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    for var in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return var
    return None


def initialize(d) -> bool:
    """Start jax.distributed when the `distributed` config section (or the environment) asks.

    Must run before anything touches a JAX backend. Returns True when it was started.
    Settings left at their auto values (empty / 0 / -1) are taken from the environment or from
    JAX's cluster auto-detection, so the same command works by hand and on a managed cluster.
    """
    explicit = bool(d.coordinator or d.num_processes or d.process_id >= 0 or d.local_device_ids)
    reason = "distributed.* keys" if explicit else _env_says_multiprocess()
    if d.initialize == "never" or (d.initialize == "auto" and reason is None):
        return False
    if jax.distributed.is_initialized():
        return True
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU devices of several processes need a collectives backend (tests, workstations).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env_n, env_id = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    kwargs = dict(
        coordinator_address=d.coordinator or None,
        num_processes=d.num_processes or (int(env_n) if env_n else None),
        process_id=d.process_id if d.process_id >= 0 else (int(env_id) if env_id else None),
        local_device_ids=list(d.local_device_ids) or None,
        initialization_timeout=d.init_timeout_s,
    )
    log.info("starting jax.distributed (%s): %s", reason or "distributed.initialize=always", kwargs)
    jax.distributed.initialize(**kwargs)
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# ---------------------------------------------------------------- host collectives
def _client():
    from jax._src import distributed as jd

    return jd.global_state.client


def _where_all(client, prefix: str) -> str:
    try:
        where = dict(client.key_value_dir_get(f"{prefix}/where/"))
    except Exception:  # the service may be gone; the stage name alone must do
        return "unknown"
    return "; ".join(f"process {k.rsplit('/', 1)[-1]}: {v}" for k, v in sorted(where.items()))


class HostSync:
    """Host sync points with a deadline, through the coordination service (one process: each is
    the identity). `name` is the namespace of its keys and barriers: every process builds the
    same HostSyncs with the same names and calls them in the same order (lockstep), and two
    HostSyncs of one process must not share a name (their sequence numbers would collide)."""

    def __init__(self, name: str = "train", timeout_s: float = 900.0):
        self.prefix = f"{_PREFIX}/{name}"
        self.timeout_s = float(timeout_s)
        self.seq = 0  # sync points passed; the same on every host

    def allgather_bytes(self, stage: str, data: bytes) -> list[bytes]:
        """`data` of every process, in process order. Waits at most `timeout_s`."""
        if jax.process_count() == 1:
            return [data]
        client, me, pre = _client(), jax.process_index(), self.prefix
        self.seq += 1
        seq = self.seq
        client.key_value_set(f"{pre}/where/{me}", f"{stage} (sync #{seq})", allow_overwrite=True)
        client.key_value_set_bytes(f"{pre}/ag/{seq}/{me}", data)
        try:
            # The stage is part of the barrier id: hosts at different stages never meet.
            client.wait_at_barrier(f"{pre}/b/{seq}/{stage}", int(self.timeout_s * 1000))
        except Exception as e:
            raise CollectiveTimeout(
                f"process {me} waited more than trainer.collective_timeout_s={self.timeout_s:g}s "
                f"at '{stage}' (sync #{seq}) for the other hosts; last known: "
                f"{_where_all(client, pre)} [{type(e).__name__}]"
            ) from None
        got = dict(client.key_value_dir_get_bytes(f"{pre}/ag/{seq}/"))
        if seq > 1:  # every host is past sync seq-1's reads once it has passed this barrier
            client.key_value_delete(f"{pre}/ag/{seq - 1}/{me}")
        return [got[f"{pre}/ag/{seq}/{p}"] for p in range(jax.process_count())]

    def barrier(self, stage: str) -> None:
        """All hosts reach `stage` (or CollectiveTimeout names it)."""
        self.allgather_bytes(stage, b"")

    def agree(self, stage: str, value) -> None:
        """Raise CollectiveTimeout at once unless every host has the same (JSON-able) value."""
        mine = json.dumps(value, sort_keys=True, default=str)
        seen = [b.decode() for b in self.allgather_bytes(stage, mine.encode())]
        if len(set(seen)) > 1:
            raise CollectiveTimeout(
                f"hosts out of step at '{stage}': "
                + "; ".join(f"process {p}: {v}" for p, v in enumerate(seen))
            )

    def allgather_arrays(self, stage: str, **arrays: np.ndarray) -> dict[str, list[np.ndarray]]:
        """Each named host-local array from every process: name -> [array of process 0, ...]."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        parts = [np.load(io.BytesIO(b)) for b in self.allgather_bytes(stage, buf.getvalue())]
        return {k: [p[k] for p in parts] for k in arrays}


def needs_sync(sync: HostSync | None, what: str) -> HostSync:
    """`sync`, or (one process) a local one; several processes without one: SetupError."""
    if sync is not None:
        return sync
    if jax.process_count() > 1:
        raise SetupError(f"{what} on {jax.process_count()} processes needs a HostSync (sync=)")
    return HostSync(what)


# ---------------------------------------------------------------- device arrays
def put_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds in full -> a global array with `sharding`.

    Each process fills only its addressable shards. Unlike `jax.device_put`, no cross-host
    equality check (a collective on every call): lockstep guarantees the values agree.
    """
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ---------------------------------------------------------------- stops and preemption
class StopSignals:
    """SIGTERM / SIGINT / JAX preemption notices -> one stop decision, agreed at a step boundary.

    The first signal only sets a flag (the run saves at the end of the current step and exits 0);
    a second one of the same kind ends the process at once. On a multi-process run SIGTERM is
    left to JAX's preemption notifier (it tells every host, and `reached_preemption_sync_point`
    picks the same step everywhere); SIGINT and any local flag are all-gathered every step, so
    a signal to one host stops all of them at the same step.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT), *,
                 sync: HostSync | None = None):  # fmt: skip
        self.reason: str | None = None
        self.sync = sync
        self._calls = 0  # step boundaries seen by this process: the same count on every host
        self._previous: dict[int, object] = {}
        self._jax_preemption = jax.process_count() > 1 and _preemption_manager() is not None
        for sig in signals:
            if sig == signal.SIGTERM and self._jax_preemption:
                continue  # JAX's notifier holds SIGTERM; see should_stop
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: no handlers, stops come only from JAX
                pass

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:  # second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.reason = name
        log.warning("%s received: saving a checkpoint at the end of this step, then exiting", name)

    def should_stop(self, step: int) -> str | None:
        """Why every host stops after `step` (the same answer on all of them), or None."""
        local = self.reason or ""
        if jax.process_count() == 1:
            return local or None
        self._calls += 1
        # JAX wants a counter that every host advances together from the same start; a resumed
        # run starts at a later step, so count boundaries since start instead of passing `step`.
        if self._jax_preemption and multihost_utils.reached_preemption_sync_point(self._calls):
            local = local or "preemption notice (SIGTERM)"
        sync = needs_sync(self.sync, "stop check")
        reasons = [
            b.decode() for b in sync.allgather_bytes(f"stop check step {step}", local.encode())
        ]
        where: dict[str, list[int]] = {}
        for p, r in enumerate(reasons):
            if r:
                where.setdefault(r, []).append(p)
        # A JAX preemption notice reaches every host: name hosts only for local signals.
        named = [
            r if len(ps) == len(reasons) else f"{r} on process {', '.join(map(str, ps))}"
            for r, ps in where.items()
        ]
        return ", ".join(named) or None

    def close(self) -> None:
        """Puts back the signal handlers that were in place before this object installed its own."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def _preemption_manager():
    from jax._src import distributed as jd

    return jd.global_state.preemption_sync_manager
