"""Rollout throughput: `htpo_jax.rollout.generate` against transformers `generate`, same model.

    python benchmarks/bench_rollout.py                 # CPU shape (default without a GPU)
    python benchmarks/bench_rollout.py --shape 0.6b    # Qwen3-0.6B shape, 128 x 256 -> 512, bf16

One random Qwen3-shaped model is built in JAX, written with `save_pretrained` and loaded into
transformers, so both samplers run the same weights in the same process. No EOS: every row
generates exactly max_new_tokens, so new tokens/s = prompts * max_new_tokens / seconds (prefill
included). Times are medians of interleaved rounds after one warm-up call each (which compiles
ours); `vs HF` divides by the faster transformers setting of the same mode. Also reports the KV
cache of our sampler: 2 (k, v) * layers * batch * (prompt + new) * kv_heads * head_dim * bytes.
Prints a table and writes JSON to benchmarks/results/bench_rollout_<backend>_<shape>.json.
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.models.decoder import Decoder
from htpo_jax.models.hf_io import save_pretrained
from htpo_jax.models.model_config import ModelConfig
from htpo_jax.rollout import bucket, generate, prompt_bucket

SHAPES = {
    # Qwen3-0.6B: 28 layers, D 1024, F 3072, 16 q / 8 kv heads of 128, vocab 151936, tied.
    "0.6b": dict(
        model=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                   num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True),
        prompts=128, prompt_len=256, new=512, dtype="bfloat16",
    ),
    # Same proportions, small enough for 2 CPU cores.
    "cpu": dict(
        model=dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
        prompts=32, prompt_len=32, new=64, dtype="float32",
    ),
}  # fmt: skip


def timed_interleaved(fns: dict, iters: int) -> dict:
    """{name: (median wall s, median process CPU s, last result)}: one warm-up call each (it
    compiles ours), then `iters` rounds that call every sampler once, so load from other
    processes on a shared machine falls on all of them alike."""
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


def kv_cache_bytes(cfg: ModelConfig, batch: int, slots: int, dtype) -> int:
    return 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def main():
    on_gpu = jax.default_backend() == "gpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b" if on_gpu else "cpu")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (ours only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    b, p, n = shape["prompts"], shape["prompt_len"], shape["new"]
    dtype = jnp.dtype(shape["dtype"])
    cfg = ModelConfig(model_type="qwen3", qk_norm=True, **shape["model"])
    model = nnx.jit(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))()
    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.vocab_size, (b, p)).astype(np.int32)
    mask = np.ones((b, p), np.int32)
    new_tokens = b * n

    def ours(greedy):
        def fn():
            r = generate(model, ids, mask, max_new_tokens=n, rng=jax.random.key(1), greedy=greedy)
            return jax.block_until_ready(r)

        return fn

    fns = {"htpo_jax greedy": ours(True), "htpo_jax sample": ours(False)}
    hf_info = None
    if not args.no_hf:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype.name))
        hf = hf.to(device).eval()
        t_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
        t_mask = torch.from_numpy(mask.astype(np.int64)).to(device)
        default_threads = torch.get_num_threads()
        hf_info = dict(transformers=transformers.__version__, torch=torch.__version__,
                       device=device, default_threads=default_threads)  # fmt: skip

        def hf_fn(sample, threads):
            def fn():
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    out = hf.generate(
                        input_ids=t_ids, attention_mask=t_mask, max_new_tokens=n,
                        min_new_tokens=n, do_sample=sample, top_k=None, top_p=None,
                        temperature=None, eos_token_id=None, pad_token_id=0,
                    )  # fmt: skip
                if device == "cuda":
                    torch.cuda.synchronize()
                torch.set_num_threads(default_threads)
                return out

            return fn

        # On a CPU shared with other work torch's thread pool can stall badly, so both its
        # default thread count and one thread are timed; the faster is the baseline.
        threads = sorted({default_threads, 1}) if device == "cpu" else [default_threads]
        for th in threads:
            fns[f"transformers greedy t{th}"] = hf_fn(False, th)
            fns[f"transformers sample t{th}"] = hf_fn(True, th)

    load_before = os.getloadavg()[0]
    timings = timed_interleaved(fns, args.iters)
    load_after = os.getloadavg()[0]
    rows = []
    for name, (sec, cpu, out) in timings.items():
        if name.startswith("htpo_jax"):
            assert int(out.lengths.min()) == n  # no EOS: every row ran to the end
        else:
            assert tuple(out.shape) == (b, p + n), out.shape
        rows.append(dict(sampler=name, seconds=sec, cpu_seconds=cpu,
                         new_tokens_per_s=new_tokens / sec))  # fmt: skip
    if hf_info is not None:
        ref = np.asarray(timings["htpo_jax greedy"][2].tokens)
        hf_greedy = timings[f"transformers greedy t{threads[0]}"][2][:, p:].cpu().numpy()
        hf_info["greedy_token_agreement"] = float((hf_greedy == ref).mean())
        for mode in ("greedy", "sample"):
            best = min((r for r in rows if r["sampler"].startswith(f"transformers {mode}")),
                       key=lambda r: r["seconds"])  # fmt: skip
            best["baseline"] = True
            for r in rows:
                if r["sampler"] == f"htpo_jax {mode}":
                    r["speedup_vs_transformers"] = best["seconds"] / r["seconds"]

    b_c, p_c = bucket(b), prompt_bucket(p)
    kv = kv_cache_bytes(cfg, b_c, p_c + n, dtype)
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({jax.default_backend()}) x{jax.device_count()}, "
        f"jax {jax.__version__}; shape {args.shape}: {cfg.num_params() / 1e6:.1f}M params, "
        f"{b} prompts x {p} -> {n} new tokens, {dtype.name}; KV cache {kv / 2**20:.1f} MiB "
        f"(batch {b_c} x {p_c + n} slots); 1-min load average {load_before:.1f} -> "
        f"{load_after:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'sampler':>26} {'seconds':>8} {'CPU s':>7} {'new tok/s':>10} {'vs HF':>7}")
    for r in rows:
        ratio = r.get("speedup_vs_transformers")
        ratio = f"{ratio:6.2f}x" if ratio else ("  (ref)" if r.get("baseline") else "      -")
        print(f"{r['sampler']:>26} {r['seconds']:8.3f} {r['cpu_seconds']:7.3f} "
              f"{r['new_tokens_per_s']:10.0f} {ratio}")  # fmt: skip
    if hf_info:
        print(f"greedy tokens equal to transformers': {hf_info['greedy_token_agreement']:.1%}")
    out = Path(
        args.out or f"benchmarks/results/bench_rollout_{jax.default_backend()}_{args.shape}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=dev.device_kind, backend=jax.default_backend(),
                devices=jax.device_count(), jax=jax.__version__, host=platform.node(),
                shape=args.shape, prompts=b, prompt_len=p, new_tokens=n, dtype=dtype.name,
                model=shape["model"], n_params=cfg.num_params(), iters=args.iters,
                kv_cache_bytes=kv, kv_cache_batch=b_c, kv_cache_slots=p_c + n,
                cpu_count=os.cpu_count(), loadavg_1min=[load_before, load_after],
                hf=hf_info)  # fmt: skip
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
