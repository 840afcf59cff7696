"""Rollout throughput: the paged engine, the static sampler and transformers `generate`, same model.

    python benchmarks/bench_rollout.py                  # CPU: uniform case, then skewed case
    python benchmarks/bench_rollout.py --case skewed    # one case only
    python benchmarks/bench_rollout.py --gpu --out r.json   # Qwen3-0.6B shape, skewed, on a GPU
    python benchmarks/bench_rollout.py --gpu --tiny     # the --gpu code path at toy shapes (CPU)

One random Qwen3-shaped model is built in JAX, written with `save_pretrained` and loaded into
transformers, so all samplers run the same weights in the same process.

Cases:
- uniform: 32 prompts x 32 tokens -> 64 new, no EOS (every row generates 64), greedy and T=1;
- skewed: 64 prompts x 4 samples, up to 512 new, T=1. The random model's next-token distribution
  is close to uniform, so a set of E token ids counted as EOS (E = V / mean) makes each step end a
  row with probability ~1 / mean: response lengths are ~geometric with mean ~64 (the measured
  mean is printed), the long tail reaching the cap;
- --gpu: Qwen3-0.6B shape (28 layers, D 1024, 16 / 8 heads of 128, F 3072, vocab 151,936, bf16),
  128 prompts x 256 tokens -> up to 512 new, T=1, torch on cuda: `--case skewed` geometric
  lengths (mean 64); `--case uniform` no EOS, all 512 (DESIGN.md's anchor work); default both.

Useful tokens/s = sum of response lengths (up to and including EOS) / wall seconds, prefill
included. In the EOS cases transformers is made to end each row where the engine's did
(`ForceLengths`: the same work; its batch still runs to its longest row); `--hf-free` lets it
draw its own lengths, which makes its time swing with its own longest row. Times are medians of
interleaved rounds after one warm-up call each (which compiles ours). `--floor` (uniform cases)
adds the model's matrix products alone, in XLA and numpy: a lower bound on any decode step here.
Peak KV-cache bytes: engine = pages in use at the peak (+ the trash page; the pool it allocates
is also printed), static = its dense [rows bucket, P bucket + N] cache, transformers = its
dynamic cache at the longest generated length. Writes JSON (--out, default
benchmarks/results/bench_rollout_<backend>_<case>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from model_shapes import QWEN3_0P6B, TINY, qwen3

from htpo_jax.models.decoder import Decoder
from htpo_jax.models.hf_io import save_pretrained
from htpo_jax.models.model_config import ModelConfig
from htpo_jax.rollout import EngineConfig, bucket, generate, prompt_bucket
from htpo_jax.rollout import engine as engine_mod

CPU_MODEL = qwen3(4096, 256, 768, 4, 4, 2, 64)  # (vocab, D, F, layers, heads, KV heads, head dim)
CASES = {
    "uniform": dict(model=CPU_MODEL, prompts=32, n=1, prompt_len=32, new=64, mean=None,
                    dtype="float32", modes=("greedy", "sample")),
    "skewed": dict(model=CPU_MODEL, prompts=64, n=4, prompt_len=32, new=512, mean=64,
                   dtype="float32", modes=("sample",)),
    "gpu": dict(model=QWEN3_0P6B, prompts=128, n=1, prompt_len=256, new=512, mean=64,
                dtype="bfloat16", modes=("sample",)),
    "gpu-uniform": dict(model=QWEN3_0P6B, prompts=128, n=1, prompt_len=256, new=512, mean=None,
                        dtype="bfloat16", modes=("sample",)),
    "gpu-tiny": dict(model=TINY, prompts=8, n=1, prompt_len=16, new=32, mean=8,
                     dtype="float32", modes=("sample",)),
}  # fmt: skip


def timed_interleaved(fns: dict, iters: int) -> dict:
    """{name: (median wall s, median process CPU s, last result)}: one warm-up call each, then
    `iters` rounds calling every sampler once (load from other processes falls on all alike)."""
    out = {name: fn() for name, fn in fns.items()}
    walls = {name: [] for name in fns}
    cpus = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out[name] = fn()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    med = statistics.median
    return {name: (med(walls[name]), med(cpus[name]), out[name]) for name in fns}


def kv_bytes(cfg: ModelConfig, batch: int, slots: int, itemsize: int) -> int:
    return 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * itemsize


def eos_set(vocab: int, mean: int | None, seed: int = 0) -> list[int] | None:
    """V / mean random token ids: with a near-uniform next-token distribution a row ends with
    probability ~1 / mean per step (geometric lengths)."""
    if mean is None:
        return None
    rng = np.random.RandomState(seed)
    return sorted(
        rng.choice(np.arange(1, vocab), size=max(1, vocab // mean), replace=False).tolist()
    )


class ForceLengths:
    """A transformers logits processor that makes row b end exactly after lengths[b] tokens (an
    EOS id forced at step lengths[b] - 1, EOS ids barred before): transformers then does the
    same work as the sampler the lengths came from (its batch still runs to its longest row)."""

    def __init__(self, lengths, prompt_len: int, eos_ids):
        import torch

        self.lengths = torch.as_tensor(np.array(lengths), dtype=torch.long)  # a writable copy
        self.p, self.eos = prompt_len, torch.as_tensor(list(eos_ids), dtype=torch.long)

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.p  # index of the token being sampled
        lengths = self.lengths.to(scores.device)
        eos = self.eos.to(scores.device)
        before = (step < lengths - 1).nonzero().flatten()
        scores[before[:, None], eos[None, :]] = -float("inf")
        at = (step == lengths - 1).nonzero().flatten()
        scores[at] = -float("inf")
        scores[at, eos[0]] = 0.0
        return scores


def matmul_floor(cfg: ModelConfig, rows: int, steps: int, dtype) -> dict:
    """{name: fn}: `steps` decode steps of the model's matrix products alone (per layer: q, k, v,
    o, gate, up, down; then the unembedding) for `rows` rows, random weights of the model's
    shapes; no attention, norms, sampling or bookkeeping. In XLA (one jitted loop) and numpy
    (the BLAS numpy links): a lower bound on any sampler's decode step on this machine."""
    r = np.random.RandomState(0)
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = dict(q=(d, nh), k=(d, kh), v=(d, kh), o=(nh, d), g=(d, f), u=(d, f), dn=(f, d))
    ws = [{k: (r.randn(*sh) * 0.02).astype(dtype) for k, sh in shapes.items()}
          for _ in range(cfg.num_layers)]  # fmt: skip
    emb = (r.randn(v, d) * 0.02).astype(dtype)
    x0 = r.randn(rows, d).astype(dtype)

    def step(x, ws, emb, xp):
        for w in ws:
            q, k, v_ = x @ w["q"], x @ w["k"], x @ w["v"]
            x = x + (q + xp.concatenate([k, v_] * (nh // (2 * kh)), 1)) @ w["o"]
            x = x + ((x @ w["g"]) * (x @ w["u"])) @ w["dn"]
        return x + 1e-3 * (x @ emb.T)[:, :d]

    loop = jax.jit(
        lambda x, ws, emb: jax.lax.fori_loop(0, steps, lambda i, x: step(x, ws, emb, jnp), x)
    )
    jws, jemb = jax.device_put((ws, emb))

    def numpy_loop():
        x = x0
        for _ in range(steps):
            x = step(x, ws, emb, np)
        return x

    done = SimpleNamespace(lengths=np.full(rows, steps))
    return {
        "matmuls only, XLA": lambda: (jax.block_until_ready(loop(x0, jws, jemb)), done)[1],
        "matmuls only, numpy": lambda: (numpy_loop(), done)[1],
    }


def run_case(name: str, case: dict, iters: int, use_hf: bool, hf_threads: str,
             match_lengths: bool = True, static: bool = True, layers_ab: bool = False,
             max_new: int | None = None, floor: bool = False) -> dict:  # fmt: skip
    b, n_samples, p, n = case["prompts"], case["n"], case["prompt_len"], max_new or case["new"]
    dtype = jnp.dtype(case["dtype"])
    cfg = case["model"]
    model = nnx.jit(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))()
    rng = np.random.RandomState(0)
    ids = rng.randint(1, cfg.vocab_size, (b, p)).astype(np.int32)
    mask = np.ones((b, p), np.int32)
    eos = eos_set(cfg.vocab_size, case["mean"])
    rows = b * n_samples
    engine_stats, engine_lengths = {}, {}

    def ours(kind, greedy, unroll=None):
        def fn():
            if kind == "static":
                kw = dict(engine="static")
            else:
                kw = dict(stats=engine_stats, engine=EngineConfig(unroll_layers=unroll))
            r = generate(model, ids, mask, max_new_tokens=n, n=n_samples, rng=jax.random.key(1),
                         greedy=greedy, eos_token_id=eos, **kw)  # fmt: skip
            if kind == "engine" and unroll is None:
                engine_lengths["greedy" if greedy else "sample"] = np.asarray(r.lengths)
            return jax.block_until_ready(r)

        return fn

    fns = {}
    for mode in case["modes"]:
        fns[f"engine {mode}"] = ours("engine", mode == "greedy")
        if layers_ab:  # the other layer form of the reference decode (EngineConfig.unroll_layers)
            other = not engine_mod.unroll_layers()
            fns[f"engine {'unrolled' if other else 'scanned'} {mode}"] = ours(
                "engine", mode == "greedy", other
            )
        if static:
            fns[f"static {mode}"] = ours("static", mode == "greedy")
    if floor and not eos:  # the uniform cases: every row decodes n steps
        fns.update(matmul_floor(cfg, rows, n, np.dtype(dtype.name)))
    hf_info, on_gpu = None, jax.default_backend() == "gpu"
    if use_hf:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype.name))
        hf = hf.to(device).eval()
        rep_ids, rep_mask = np.repeat(ids, n_samples, 0), np.repeat(mask, n_samples, 0)
        t_ids = torch.from_numpy(rep_ids.astype(np.int64)).to(device)
        t_mask = torch.from_numpy(rep_mask.astype(np.int64)).to(device)
        default_threads = torch.get_num_threads()
        hf_info = dict(transformers=transformers.__version__, torch=torch.__version__,
                       device=device, default_threads=default_threads)  # fmt: skip

        def hf_fn(sample, threads):
            def fn():
                torch.set_num_threads(threads)
                extra = {}
                if eos and match_lengths:  # the engine's response lengths: the same work
                    lengths = engine_lengths["sample" if sample else "greedy"]
                    extra["logits_processor"] = [ForceLengths(lengths, p, eos)]
                with torch.inference_mode():
                    out = hf.generate(
                        input_ids=t_ids, attention_mask=t_mask, max_new_tokens=n,
                        min_new_tokens=None if eos else n, do_sample=sample, top_k=None,
                        top_p=None, temperature=None, eos_token_id=eos, pad_token_id=0, **extra,
                    )  # fmt: skip
                if device == "cuda":
                    torch.cuda.synchronize()
                torch.set_num_threads(default_threads)
                return out[:, p:].cpu().numpy()

            return fn

        # On a shared CPU torch's thread pool can stall, so one thread is timed too ("both").
        th = {"default": [default_threads], "1": [1], "both": sorted({default_threads, 1})}
        threads = th[hf_threads] if device == "cpu" else [default_threads]
        for t in threads:
            for mode in case["modes"]:
                fns[f"transformers {mode} t{t}"] = hf_fn(mode == "sample", t)

    load_before = os.getloadavg()[0]
    timings = timed_interleaved(fns, iters)
    load_after = os.getloadavg()[0]
    for mode in case["modes"] if layers_ab else ():  # the two layer forms: the same rows?
        alt = next(k for k in timings if k.startswith("engine ") and k.endswith(f"ed {mode}"))
        a, b_ = (np.asarray(timings[k][2].tokens) for k in (f"engine {mode}", alt))
        print(f"{alt}: tokens equal to the default engine's at {np.mean(a == b_):.1%} of slots")
    static_kv = kv_bytes(cfg, bucket(rows), prompt_bucket(p) + n, dtype.itemsize)
    results = []
    for sampler, (sec, cpu, out) in timings.items():
        if sampler.startswith("transformers"):
            eos_hit = np.isin(out, eos) if eos else np.zeros(out.shape, bool)
            lengths = np.where(eos_hit.any(-1), eos_hit.argmax(-1) + 1, out.shape[1])
            peak = kv_bytes(cfg, rows, p + out.shape[1], dtype.itemsize)
        else:
            lengths = np.asarray(out.lengths)
            peak = engine_stats["peak_kv_bytes"] if sampler.startswith("engine") else static_kv
            peak = 0 if sampler.startswith("matmuls") else peak
        useful = int(lengths.sum())
        results.append(dict(sampler=sampler, seconds=sec, cpu_seconds=cpu, useful_tokens=useful,
                            mean_length=float(lengths.mean()), max_length=int(lengths.max()),
                            useful_tokens_per_s=useful / sec, peak_kv_bytes=peak))  # fmt: skip
    for mode in case["modes"]:
        by = {r["sampler"]: r for r in results}
        hf_rows = [r for r in results if r["sampler"].startswith(f"transformers {mode}")]
        hf_best = min(hf_rows, key=lambda r: r["seconds"]) if hf_rows else None
        for kind in ("engine", "static"):
            if f"{kind} {mode}" not in by:
                continue
            r = by[f"{kind} {mode}"]
            if hf_best:
                r["vs_transformers"] = r["useful_tokens_per_s"] / hf_best["useful_tokens_per_s"]
            if kind == "engine" and f"static {mode}" in by:
                r["vs_static"] = (
                    r["useful_tokens_per_s"] / by[f"static {mode}"]["useful_tokens_per_s"]
                )
    dev = jax.devices()[0]
    meta = dict(case=name, device=dev.device_kind, backend=jax.default_backend(),
                jax=jax.__version__, host=platform.node(), prompts=b, samples_per_prompt=n_samples,
                prompt_len=p, max_new_tokens=n, eos_ids=len(eos or ()), dtype=dtype.name,
                n_params=cfg.num_params(), iters=iters, cpu_count=os.cpu_count(),
                loadavg_1min=[load_before, load_after], engine=dict(engine_stats),
                hf=hf_info)  # fmt: skip
    print(f"\n== {name}: {cfg.num_params() / 1e6:.1f}M params, {b} prompts x {n_samples} samples, "
          f"{p} -> up to {n} new, {dtype.name}, {len(eos or ())} EOS ids; {dev.device_kind}; "
          f"1-min load {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    pool_mib = engine_stats.get("pool_bytes", 0) / 2**20
    print(f"engine: max_num_seqs {engine_stats.get('max_num_seqs')}, pool {pool_mib:.1f} MiB, "
          f"rounds {engine_stats.get('rounds')}, "
          f"preemptions {engine_stats.get('preemptions')}")  # fmt: skip
    print(f"{'sampler':>24} {'seconds':>8} {'CPU s':>7} {'mean len':>8} {'useful tok/s':>12} "
          f"{'peak KV MiB':>11} {'vs HF':>6} {'vs static':>9}")  # fmt: skip
    for r in results:
        vs_hf = f"{r['vs_transformers']:5.2f}x" if "vs_transformers" in r else "     -"
        vs_st = f"{r['vs_static']:8.2f}x" if "vs_static" in r else "        -"
        print(f"{r['sampler']:>24} {r['seconds']:8.3f} {r['cpu_seconds']:7.3f} "
              f"{r['mean_length']:8.1f} {r['useful_tokens_per_s']:12.0f} "
              f"{r['peak_kv_bytes'] / 2**20:11.1f} {vs_hf} {vs_st}")  # fmt: skip
    if not eos:  # uniform: every call decodes n steps (prefill included in the engine's time)
        print("per step (seconds / new tokens): " + ", ".join(
            f"{r['sampler']} {r['seconds'] / n * 1e3:.2f} ms" for r in results))  # fmt: skip
    return dict(meta=meta, rows=results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["uniform", "skewed", "all"], default="all")
    ap.add_argument("--gpu", action="store_true", help="Qwen3-0.6B shape on the GPU")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: toy shapes (tests the path)")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds (default 3; --gpu 1)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--hf-threads", choices=["default", "1", "both"], default="both")
    ap.add_argument(
        "--hf-free",
        action="store_true",
        help="EOS cases: let transformers draw its own lengths (default: the engine's)",
    )
    ap.add_argument("--no-static", action="store_true", help="skip the static sampler")
    ap.add_argument(
        "--layers-ab",
        action="store_true",
        help="also time the engine with the other layer form (scanned / unrolled)",
    )
    ap.add_argument("--max-new", type=int, default=None, help="override the case's new tokens")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="uniform cases: also time the model's matrix products alone (XLA, numpy)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.gpu and args.tiny:
        names = ["gpu-tiny"]
    elif args.gpu:
        names = {"skewed": ["gpu"], "uniform": ["gpu-uniform"]}.get(
            args.case, ["gpu", "gpu-uniform"]
        )
    else:
        names = ["uniform", "skewed"] if args.case == "all" else [args.case]
    iters = args.iters or (1 if args.gpu else 3)
    report = {name: run_case(name, CASES[name], iters, not args.no_hf, args.hf_threads,
                             not args.hf_free, not args.no_static, args.layers_ab, args.max_new,
                             args.floor)
              for name in names}  # fmt: skip
    tag = "-".join(names)
    out = Path(args.out or f"benchmarks/results/bench_rollout_{jax.default_backend()}_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
