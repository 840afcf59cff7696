"""Compile targets for `compile_check`: TPU slice names -> libtpu topologies, HBM per chip.

`v5p-N` and `v4-N` count TensorCores (2 per chip, as Cloud TPU names v5p and v4 slices: v4-8 is
4 chips, one JAX device per chip); `v5e-N` / `v5litepod-N` and `v6e-N` count chips. The
topology is built by `jax.experimental.topologies` from libtpu's compiler alone: the environment
variables set in `Target.setup_env` (before libtpu initializes) tell it not to look for TPU
hardware or the GCE metadata server. `cpu:N` is N fake CPU devices.
"""

from __future__ import annotations

import dataclasses
import os

GiB = 2**30

# generation -> (libtpu name, chips -> topology, HBM per chip in bytes, accelerator-type prefix)
_V5E_SHAPES = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_3D_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
               256: "4x8x8"}  # fmt: skip
GENERATIONS = {
    "v5p": ("v5p", _3D_SHAPES, 95 * GiB, "v5p"),
    "v4": ("v4", _3D_SHAPES, 32 * GiB, "v4"),  # v4-8 ... v4-512
    "v5e": ("v5e", _V5E_SHAPES, 16 * GiB, "v5litepod"),
    "v6e": ("v6e", _V5E_SHAPES, 32 * GiB, "v6e"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# Generations whose slice names count TensorCores (2 per chip) rather than chips.
TWO_CORES_A_CHIP = ("v5p", "v4")


@dataclasses.dataclass(frozen=True)
class Peaks:
    """One chip's peaks: dense bf16 FLOP/s, HBM bytes/s, ICI bytes/s (all links, one way)."""

    bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float


# Per chip, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/<gen>, read
# 2026-12): v4 275 TFLOP/s bf16, 1,200 GB/s HBM2; v5e 197 TFLOP/s, 819 GB/s, ICI 1,600 Gbps;
# v5p 459 TFLOP/s, 2,765 GB/s, ICI 4,800 Gbps; v6e 918 TFLOP/s, 1,640 GB/s, ICI 3,584 Gbps. The
# v4 page gives no per-chip ICI figure: 2,400 Gbps (6 ICI links)
# is from the TPU v4 paper (Jouppi et al., ISCA 2023) and the least certain number here.
PEAKS = {
    "v4": Peaks(275e12, 1200e9, 2400e9 / 8),
    "v5e": Peaks(197e12, 819e9, 1600e9 / 8),
    "v5p": Peaks(459e12, 2765e9, 4800e9 / 8),
    "v6e": Peaks(918e12, 1640e9, 3584e9 / 8),
}


class TargetError(ValueError):
    """A bad --topology / --devices value, in one line."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: a TPU slice (libtpu topology, compile-only) or N fake CPU devices, with its
    chip count and HBM bytes per chip."""

    kind: str  # "tpu" or "cpu"
    name: str  # e.g. "v5p-64" or "cpu:4"
    chips: int
    hbm_bytes: int
    topology: str = ""  # libtpu name, e.g. "v5p:2x4x4"
    accelerator_type: str = ""  # e.g. "v5p-64", "v5litepod-8"

    @property
    def peaks(self) -> Peaks | None:
        """The chip's peaks (None for fake CPU devices: no physical floor to compare with)."""
        return PEAKS.get(self.name.partition("-")[0]) if self.kind == "tpu" else None

    def setup_env(self) -> None:
        """Environment for libtpu / XLA; must run before JAX initializes a backend."""
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the default backend; TPU is compile-only
        if self.kind == "cpu":
            flag = f"--xla_force_host_platform_device_count={self.chips}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
            return
        os.environ["TPU_SKIP_MDS_QUERY"] = "1"  # no GCE metadata server here
        os.environ["TPU_ACCELERATOR_TYPE"] = self.accelerator_type
        os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
        # Compile-only use: several processes (tests, users) may load libtpu at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    def devices(self) -> list:
        """The target's devices: the first `chips` CPU devices, or the TPU topology's devices from
        libtpu; TargetError when they cannot be had."""
        import jax

        if self.kind == "cpu":
            devs = jax.devices("cpu")
            if len(devs) < self.chips:
                raise TargetError(
                    f"--devices cpu:{self.chips}: JAX already started with {len(devs)} CPU "
                    f"devices (run compile_check in a fresh process)"
                )
            return devs[: self.chips]
        try:
            from jax.experimental import topologies

            # v4's compile-only topology lists each TensorCore as a device unless asked for
            # megacore (one device per chip, as a v4 runtime runs and jax meshes require).
            kwargs = {"chip_config_name": "megacore"} if self.topology.startswith("v4:") else {}
            return list(topologies.get_topology_desc(self.topology, "tpu", **kwargs).devices)
        except (ImportError, RuntimeError) as e:
            raise TargetError(
                f"cannot build TPU topology {self.topology} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160]}); install the TPU compiler: "
                f'pip install -e ".[tpu]"'
            ) from None


def resolve_target(topology: str | None, devices: str | None, hbm_gib: float | None) -> Target:
    """A Target from `--topology v5p-64` or `--devices cpu:4` (+ optional `--hbm-gib`)."""
    hbm = None if hbm_gib is None else int(hbm_gib * GiB)
    if devices is not None:
        kind, _, n = devices.partition(":")
        if kind != "cpu" or not n.isdigit() or int(n) < 1:
            raise TargetError(f"--devices: expected cpu:N (N >= 1), got {devices!r}")
        if hbm is None:  # no HBM: the host's memory shared by the fake devices
            hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // int(n)
        return Target("cpu", devices, int(n), hbm)
    gen, _, count = (topology or "").lower().partition("-")
    gen = ALIASES.get(gen, gen)
    if gen not in GENERATIONS or not count.isdigit():
        raise TargetError(
            f"--topology: expected e.g. v5p-64, v5e-8, v6e-8 (generations: "
            f"{', '.join(GENERATIONS)}), got {topology!r}"
        )
    libtpu_name, shapes, chip_hbm, prefix = GENERATIONS[gen]
    cores = 2 if gen in TWO_CORES_A_CHIP else 1
    chips = int(count) // cores
    if chips not in shapes or int(count) % cores:
        known = ", ".join(f"{gen}-{c * cores}" for c in shapes)
        raise TargetError(f"--topology {topology}: {gen} slices known here: {known}")
    return Target(
        "tpu",
        f"{gen}-{count}",
        chips,
        hbm if hbm is not None else chip_hbm,
        topology=f"{libtpu_name}:{shapes[chips]}",
        accelerator_type=f"{prefix}-{count}",
    )
