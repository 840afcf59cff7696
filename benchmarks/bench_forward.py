"""Training-path throughput of the trainer's own update (`train_step.py`): forward + backward
through `logprobs_and_entropy` and the HTPO loss, and the whole optimizer update.

    python benchmarks/bench_forward.py                 # CPU-sized model (default without a GPU)
    python benchmarks/bench_forward.py --shape 0.6b    # Qwen3-0.6B shape, batch 8 x 4096, remat

Random weights (throughput does not depend on them). Compute in bfloat16 (`--dtype`) over float32
parameters. Two rows, both the trainer's jitted functions on one `UpdateBatch` (prompt = the first
quarter of each row, left padded; response = the rest): fwd+bwd is `jit_micro_grads` (the
gradient of `micro_loss`, added into a donated accumulator), fwd+bwd+adamw is `jit_update` (the
same gradient, global-norm clipping, AdamW, the non-finite check; TrainState donated).

Counted FLOPs per step (the usual MFU convention; remat's recomputed forward is NOT counted):
    6 * N_matmul * tokens               N_matmul = layer weights + the unembedding (V x D; the
                                        input embedding is a gather, not counted)
  + 12 * L * N_heads * H * T * tokens   attention scores and weighted values, fwd (4) + bwd (8),
                                        the full T x T matrix (the kernel computes all of it)
Prints a table, writes JSON to benchmarks/results/bench_forward_<platform>_<shape>_<dtype>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from htpo_jax.models.decoder import Decoder
from htpo_jax.models.model_config import ModelConfig
from htpo_jax.rl.train_step import (
    StepConfig,
    TrainState,
    UpdateBatch,
    jit_micro_grads,
    jit_update,
    make_optimizer,
    score_responses,
)
from htpo_jax.run.config import load_config

LOSS_NAME = "htpo_loss (train_step.micro_loss)"

SHAPES = {
    # Qwen3-0.6B: 28 layers, D 1024, F 3072, 16 q / 8 kv heads of 128, vocab 151936, tied.
    "0.6b": dict(
        model=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                   num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True),
        batch=8, seq=4096, chunk=512, attention_chunk=512,
    ),
    # Same proportions, small enough for 2 CPU cores.
    "cpu": dict(
        model=dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
        batch=4, seq=512, chunk=256, attention_chunk=256,
    ),
}  # fmt: skip


def count_flops(cfg: ModelConfig, batch: int, seq: int) -> dict:
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    layer = 2 * d * cfg.num_heads * h + 2 * d * cfg.num_kv_heads * h + 3 * d * f
    n_matmul = cfg.num_layers * layer + cfg.vocab_size * d
    tokens = batch * seq
    attention = 12 * cfg.num_layers * cfg.num_heads * h * seq * tokens
    return dict(n_params=cfg.num_params(), n_matmul=n_matmul, tokens=tokens,
                flops=6 * n_matmul * tokens + attention, attention_flops=attention)  # fmt: skip


def make_batch(cfg: ModelConfig, b: int, t: int, graphdef, params, chunk: int, seed: int = 0):
    """An `UpdateBatch` laid out [1 micro-batch, b, ...]: left-padded prompts (the first quarter)
    + responses of random lengths; old log-probs slightly off the policy's (ratios != 1)."""
    k = jax.random.split(jax.random.key(seed), 4)
    ids = jax.random.randint(k[0], (b, t), 0, cfg.vocab_size)
    prompt = t // 4
    pad = jax.random.randint(k[1], (b, 1), 0, prompt // 2)
    resp_len = jax.random.randint(k[2], (b, 1), t // 4, t - prompt + 1)
    pos = jnp.arange(t)[None]
    mask = ((pos >= pad) & (pos < prompt + resp_len)).astype(jnp.int32)
    response_mask = mask[:, prompt:].astype(jnp.float32)  # [b, R = t - P]
    flags = jax.random.bernoulli(k[3], 0.5, (2, b))
    lp, _ = score_responses(graphdef, params, ids, mask, prompt, 1.0, chunk)
    batch = UpdateBatch(
        input_ids=ids, attention_mask=mask, response_mask=response_mask,
        old_log_prob=(lp + 0.01) * response_mask, ref_log_prob=jnp.zeros_like(response_mask),
        advantages=jnp.where(flags[1], 1.0, -1.0)[:, None] * response_mask,
        hard=flags[0], correct=flags[1], prompt_len=prompt,
    )  # fmt: skip
    return jax.tree.map(lambda x: x[None], batch)  # [b, ...] -> [1, b, ...]


def timed(step, iters):
    """Median seconds per `step()` after two warm-up calls (compile + one more)."""
    for _ in range(2):
        jax.block_until_ready(step())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    on_gpu = jax.default_backend() == "gpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b" if on_gpu else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="compute dtype (parameters are float32 either way)")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    b, t = args.batch or shape["batch"], args.seq or shape["seq"]
    cfg = ModelConfig(model_type="qwen3", qk_norm=True, **shape["model"])
    remat = not args.no_remat
    model = nnx.jit(
        lambda: Decoder(
            cfg,
            dtype=jnp.dtype(args.dtype),
            param_dtype=jnp.float32,
            remat=remat,
            attention_chunk_size=shape["attention_chunk"],
            rngs=nnx.Rngs(0),
        )
    )()
    chunk = shape["chunk"]
    graphdef, params = nnx.split(model)
    del model
    batch = make_batch(cfg, b, t, graphdef, params, chunk)
    run_cfg = load_config(None, ["optim.learning_rate=1e-6", "optim.warmup_steps=0"])
    step_cfg = StepConfig.from_config(run_cfg)
    step_cfg = dataclasses.replace(step_cfg, chunk_size=chunk)
    tx = make_optimizer(run_cfg.optim, total_steps=1)
    own = jax.tree.map(jnp.copy, params)  # the update donates its state; fwd_bwd reads `params`
    state = TrainState.create(own, tx)
    micro = jax.tree.map(lambda x: x[0], batch)
    num_tokens = jnp.sum(micro.response_mask)
    num_seqs = jnp.sum(jnp.any(micro.response_mask > 0, -1)).astype(jnp.float32)
    grads_fn, update_fn = jit_micro_grads(graphdef, step_cfg), jit_update(graphdef, tx, step_cfg)
    carry = {"grads": jax.tree.map(jnp.zeros_like, params), "state": state}

    def fwd_bwd():  # the accumulator is donated: carry it from call to call
        carry["grads"], metrics = grads_fn(carry["grads"], params, micro, num_tokens, num_seqs)
        return metrics["policy_loss"]

    def train_step():  # the TrainState is donated: carry it from call to call
        carry["state"], metrics = update_fn(carry["state"], batch)
        return metrics["loss"]

    flops = count_flops(cfg, b, t)
    rows = []
    for name, step in [
        ("fwd+bwd", fwd_bwd),
        ("fwd+bwd+adamw", train_step),
    ]:
        sec = timed(step, args.iters)
        rows.append(dict(step=name, ms=sec * 1e3, tokens_per_s=flops["tokens"] / sec,
                         tflops_per_s=flops["flops"] / sec / 1e12))  # fmt: skip

    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}) x{jax.device_count()}, "
        f"jax {jax.__version__}; shape {args.shape}: {flops['n_params'] / 1e6:.1f}M params, "
        f"batch {b} x {t}, {args.dtype} compute / f32 params, remat={remat}, loss={LOSS_NAME}"
    )
    print(f"{'step':>15} {'ms':>10} {'tokens/s':>12} {'TFLOP/s':>9}")
    for r in rows:
        print(f"{r['step']:>15} {r['ms']:10.1f} {r['tokens_per_s']:12.0f} {r['tflops_per_s']:9.3f}")
    name = f"bench_forward_{jax.default_backend()}_{args.shape}_{args.dtype}.json"
    out = Path(args.out or f"benchmarks/results/{name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device.device_kind, backend=jax.default_backend(),
                devices=jax.device_count(), jax=jax.__version__, host=platform.node(),
                shape=args.shape, dtype=args.dtype, batch=b, seq=t, remat=remat, loss=LOSS_NAME,
                iters=args.iters, model=shape["model"], logprob_chunk=chunk,
                attention_chunk=shape["attention_chunk"], **flops)  # fmt: skip
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
