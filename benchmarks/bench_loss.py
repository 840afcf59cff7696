"""Jitted forward+backward of `htpo_loss` against `dapo_loss`, measured side by side in one run.

    python benchmarks/bench_loss.py [--shapes 16x20480,256x4096,1024x1024] [--dtype float32]

Prints a table (ms per call: median of --iters interleaved calls after warm-up, the HTPO/DAPO
ratio of medians, and the minima)
and writes JSON to benchmarks/results/bench_loss_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from htpo_jax.rl.loss import dapo_loss, htpo_loss


def make_batch(b, t, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    old = -jnp.abs(jax.random.normal(ks[0], (b, t), dtype)) * 2
    lp = old + 0.1 * jax.random.normal(ks[1], (b, t), dtype)
    ent = jnp.abs(jax.random.normal(ks[2], (b, t), dtype)) * 2
    adv = jnp.broadcast_to(jax.random.normal(ks[3], (b, 1), dtype), (b, t))
    lengths = jax.random.randint(ks[4], (b, 1), t // 4, t + 1)
    mask = (jnp.arange(t)[None] < lengths).astype(dtype)
    flags = jax.random.bernoulli(ks[5], 0.5, (2, b))
    return lp, old, ent, adv, mask, flags[0], flags[1]


def timed_pair(fns, args, iters):
    """Median and min ms per call of each fn, calls interleaved so that load on a shared machine
    hits both alike (the ratio is what this benchmark is about)."""
    for fn in fns:
        jax.block_until_ready(fn(*args))  # compile
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append((time.perf_counter() - t0) * 1e3)
    return [(statistics.median(ts), min(ts)) for ts in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="16x20480,256x4096,1024x1024")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)

    htpo = jax.jit(jax.value_and_grad(lambda lp, *a: htpo_loss(lp, *a)[0]))
    dapo = jax.jit(
        jax.value_and_grad(lambda lp, old, ent, adv, m, h, c: dapo_loss(lp, old, adv, m)[0])
    )

    device = jax.devices()[0]
    rows = []
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), dtype {args.dtype}, "
        f"jax {jax.__version__}"
    )
    print(f"{'shape':>12} {'htpo ms':>9} {'dapo ms':>9} {'ratio':>7}   (medians; min htpo/dapo)")
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        batch = make_batch(b, t, dtype)
        (ms_h, min_h), (ms_d, min_d) = timed_pair((htpo, dapo), batch, args.iters)
        rows.append(
            dict(
                shape=shape,
                htpo_ms=ms_h,
                dapo_ms=ms_d,
                ratio=ms_h / ms_d,
                htpo_min_ms=min_h,
                dapo_min_ms=min_d,
            )
        )
        print(
            f"{shape:>12} {ms_h:9.3f} {ms_d:9.3f} {ms_h / ms_d:7.2f}   ({min_h:.3f} / {min_d:.3f})"
        )
    out = Path(args.out or f"benchmarks/results/bench_loss_{jax.default_backend()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=device.device_kind,
        backend=jax.default_backend(),
        dtype=args.dtype,
        jax=jax.__version__,
        host=platform.node(),
        iters=args.iters,
    )
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
