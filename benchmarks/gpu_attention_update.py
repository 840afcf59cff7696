"""cuDNN attention on a GPU: parity with XLA attention, and the trainer's update timed per
attention implementation.

    python benchmarks/gpu_attention_update.py [--out results.json]   # on a GPU
    python benchmarks/gpu_attention_update.py --tiny                 # small shapes, any device

(1) Parity: `self_attention(impl="cudnn")` against `impl="xla"`, bf16, grouped-query heads,
    causal, rows with left padding (prompts) and right padding (responses); values at real
    positions and the gradients of q, k, v under a loss that weights only real positions,
    at a few shapes. Both are compared with a float32 XLA reference; cuDNN passes when its
    error is within 2x XLA's own bf16 error plus a small floor. Without a GPU the cuDNN
    row runs the same padding rotation through XLA (`implementation="xla"`).
(2) Timing: `htpo_jax.rl.train_step.jit_update` (the trainer's jitted update: micro-batch
    gradient accumulation, HTPO loss, AdamW) on a random Qwen3-0.6B-shaped model (28 layers,
    D 1024, 16 q / 8 kv heads of 128, F 3072, vocab 151,936, tied; bf16 compute over f32
    parameters, remat) at 8 x 4096 tokens, for attention_impl = cudnn, xla, chunked:
    median ms/step and tokens/s after warm-up.
Prints every number; writes JSON to --out. Exit status 1 when a parity check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_shapes import QWEN3_0P6B, TINY, trainer_decoder  # noqa: E402

from htpo_jax.models import attention as A  # noqa: E402
from htpo_jax.rl.loss import LossConfig  # noqa: E402
from htpo_jax.rl.train_step import (  # noqa: E402
    StepConfig,
    TrainState,
    UpdateBatch,
    jit_update,
    make_optimizer,
)
from htpo_jax.run.config import OptimConfig  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"


def padded_inputs(b, t, n, k, h, seed):
    r = np.random.RandomState(seed)
    q, kk, v = (jnp.asarray(r.randn(b, t, m, h), jnp.float32) for m in (n, k, k))
    mask = np.ones((b, t), bool)
    for i in range(b):  # left padding up to t/4, right padding up to t/4 on odd rows
        mask[i, : r.randint(0, t // 4 + 1)] = False
        if i % 2:
            mask[i, t - r.randint(1, t // 4 + 1) :] = False
    w = jnp.asarray(r.randn(b, t, n, h), jnp.float32) * jnp.asarray(mask)[:, :, None, None]
    return q, kk, v, jnp.asarray(mask), w


def value_and_grads(attn, q, k, v, mask, w, dtype):
    def loss(q, k, v):
        out = attn(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask)
        return (out.astype(jnp.float32) * w).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out.astype(jnp.float32), [g.astype(jnp.float32) for g in grads]


def parity(shapes) -> tuple[list[dict], bool]:
    cudnn = (
        (lambda q, k, v, m: A.self_attention(q, k, v, m, impl="cudnn"))
        if ON_GPU
        else (lambda q, k, v, m: A.cudnn_self_attention(q, k, v, m, implementation="xla"))
    )
    xla = lambda q, k, v, m: A.self_attention(q, k, v, m, impl="xla")
    rows, ok = [], True
    for b, t, n, k, h in shapes:
        q, kk, v, mask, w = padded_inputs(b, t, n, k, h, seed=t)
        real = np.asarray(mask)
        ref_out, ref_g = value_and_grads(xla, q, kk, v, mask, w, jnp.float32)
        row = dict(shape=[b, t, n, k, h], cudnn_ran_on_gpu=ON_GPU)
        for name, fn in (("xla_bf16", xla), ("cudnn_bf16", cudnn)):
            try:
                out, g = value_and_grads(fn, q, kk, v, mask, w, jnp.bfloat16)
            except Exception as e:  # noqa: BLE001 - report and fail, do not hide
                traceback.print_exc()
                row[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
                continue
            errs = [float(np.abs(np.asarray(out - ref_out))[real].max())]
            errs += [float(jnp.abs(a - r).max()) for a, r in zip(g, ref_g, strict=True)]
            scale = [float(np.abs(np.asarray(ref_out))[real].max())]
            scale += [float(jnp.abs(r).max()) for r in ref_g]
            row[name] = dict(rel_err=[e / s for e, s in zip(errs, scale, strict=True)])
        if "error" in row.get("cudnn_bf16", {}) or "error" in row.get("xla_bf16", {}):
            row["pass"] = False
        else:
            row["pass"] = all(
                c <= 2 * x + 1e-2
                for c, x in zip(
                    row["cudnn_bf16"]["rel_err"], row["xla_bf16"]["rel_err"], strict=True
                )
            )
        ok &= row["pass"]
        rel = lambda r: " ".join(f"{e:.2e}" for e in r.get("rel_err", [])) or r.get("error")
        print(
            f"parity B,T,N,K,H={row['shape']}: rel err vs f32 [out dq dk dv] "
            f"xla bf16 {rel(row['xla_bf16'])} | cudnn bf16 {rel(row['cudnn_bf16'])} "
            f"-> {'PASS' if row['pass'] else 'FAIL'}",
            flush=True,
        )
        rows.append(row)
    return rows, ok


def update_batch(cfg, b, t, prompt):
    """One mini-batch of one micro-batch, [1, B, ...]: left-padded prompts + responses."""
    r = np.random.RandomState(0)
    ids = r.randint(0, cfg.vocab_size, (1, b, t)).astype(np.int32)
    pos = np.arange(t)[None, None]
    left = r.randint(0, prompt // 2, (1, b, 1))
    resp_len = r.randint(t // 4, t - prompt + 1, (1, b, 1))
    mask = (pos >= left) & (pos < prompt + resp_len)
    resp = mask[..., prompt:].astype(np.float32)
    rr = t - prompt
    return UpdateBatch(
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.asarray(mask.astype(np.int32)),
        response_mask=jnp.asarray(resp),
        old_log_prob=jnp.asarray(-2.0 - 0.1 * r.rand(1, b, rr), jnp.float32),
        ref_log_prob=jnp.zeros((1, b, rr), jnp.float32),
        advantages=jnp.asarray(np.where(r.rand(1, b, 1) < 0.5, 1.0, -1.0) * np.ones((1, b, rr))),
        hard=jnp.asarray(r.rand(1, b) < 0.5),
        correct=jnp.asarray(r.rand(1, b) < 0.5),
        prompt_len=prompt,
    )


def time_update(cfg, impl, b, t, prompt, chunk, iters) -> dict:
    model = nnx.jit(lambda: trainer_decoder(cfg, impl, chunk))()
    graphdef, params = nnx.split(model)
    del model
    # the trainer's optimizer (global-norm clip + AdamW, lr in opt_state.hyperparams); warmup off
    tx = make_optimizer(OptimConfig(warmup_steps=0), total_steps=1)
    sc = StepConfig(loss="htpo", loss_config=LossConfig(), temperature=1.0, chunk_size=chunk)
    step = jit_update(graphdef, tx, sc)
    state = TrainState.create(params, tx)
    batch = update_batch(cfg, b, t, prompt)
    t0 = time.perf_counter()
    for _ in range(2):  # compile + one more
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    loss = float(metrics["loss"])
    del state
    return dict(impl=impl, ms=sec * 1e3, tokens_per_s=b * t / sec, loss=loss,
                warmup_s=warm, times_ms=[x * 1e3 for x in times])  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes (runs on a CPU)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--impls", default=None, help="comma list (default: cudnn,xla,chunked)")
    ap.add_argument("--out", default=None, help="write JSON here")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if args.tiny:
        shapes = [(2, 32, 4, 2, 16), (3, 48, 4, 1, 32)]
        cfg = TINY
        b, t, prompt, chunk = 2, 64, 16, 16
    else:
        shapes = [(2, 256, 16, 8, 128), (4, 1024, 16, 8, 128), (1, 4096, 32, 8, 128)]
        cfg = QWEN3_0P6B
        b, t, prompt, chunk = 8, 4096, 1024, 512
    parity_rows, ok = parity(shapes)

    impls = args.impls.split(",") if args.impls else ["cudnn", "xla", "chunked"]
    if not ON_GPU and "cudnn" in impls:
        print("timing: cudnn skipped (no GPU)")
        impls = [i for i in impls if i != "cudnn"]
    timing = []
    print(
        f"update: {cfg.num_layers} layers, D {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{b} x {t} tokens (prompt {prompt}), bf16 / f32 params, remat, HTPO loss, AdamW"
    )
    for impl in impls:
        try:
            r = time_update(cfg, impl, b, t, prompt, chunk, args.iters)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for full attention
            traceback.print_exc()
            r = dict(impl=impl, error=f"{type(e).__name__}: {e}"[:300])
            print(f"update attention_impl={impl}: ERROR {r['error']}", flush=True)
        else:
            print(
                f"update attention_impl={impl:<8} {r['ms']:9.1f} ms/step "
                f"{r['tokens_per_s']:10.0f} tokens/s  (loss {r['loss']:.4f}, "
                f"warm-up {r['warmup_s']:.1f} s)",
                flush=True,
            )
        timing.append(r)
    base = {r["impl"]: r for r in timing if "ms" in r}
    if "xla" in base:
        for impl, r in base.items():
            print(f"speed-up of {impl} over xla: {base['xla']['ms'] / r['ms']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=dev.device_kind, backend=jax.default_backend(),
                           jax=jax.__version__, parity=parity_rows, parity_ok=ok,
                           update=timing, batch=b, seq=t, prompt=prompt), f, indent=1)  # fmt: skip
    print("parity: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
