"""LoRA rollouts: adapters applied in every projection vs merged into the weights once per step.

    PYTHONPATH=. python benchmarks/bench_lora_rollout.py [--rank 8] [--rounds 5]

The shipped default model (`assets/arith_model`) with rank-r adapters on every projection (B
random, so the adapters change the output), sampling the default run's rollout call: 32 prompts
x 8 responses, up to 64 new tokens, T = 1, the paged engine. "applied" samples the adapted
model as the trainer does (x W + (alpha/r) (x A) B in each projection); "merged" first folds
the adapters into a copy of the weights (W + (alpha/r) A B, `lora.merge_adapters`, timed and
included) and samples the plain model. Prints the median wall time of each after one warm-up
(compiling) call, interleaved rounds, and whether both drew the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from htpo_jax.models import lora
from htpo_jax.models.hf_io import from_pretrained, load_tokenizer
from htpo_jax.rollout import Sampler

ROOT = Path(__file__).resolve().parents[1]


def prompts(tokenizer, n: int, width: int = 64):
    """The first `n` training prompts of the default run, left padded to `width`."""
    rows = [json.loads(line) for line in (ROOT / "assets/arith/train.jsonl").open()][:n]
    ids = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.int32)
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        toks = tokenizer(text)["input_ids"][-width:]
        ids[i, width - len(toks) :], mask[i, width - len(toks) :] = toks, 1
    return ids, mask


def main() -> None:
    """Times applied vs merged sampling and prints one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    path = ROOT / "assets/arith_model"
    model = from_pretrained(path, dtype="float32", param_dtype="float32")
    lora.add_adapters(model, lora.LoraSpec(rank=args.rank, base_dtype="float32"))
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        var.set_value(0.05 * jax.random.normal(jax.random.key(i), var.shape, var.dtype))
    tokenizer = load_tokenizer(path)
    ids, mask = prompts(tokenizer, 32)
    kw = dict(max_new_tokens=64, n=8, temperature=1.0, eos_token_id=tokenizer.eos_token_id)
    applied_sampler = Sampler.from_model(model)
    _, params = nnx.split(model)
    merged_sampler = Sampler.from_model(lora.merge_adapters(model))

    def applied(key):
        return applied_sampler(params, ids, mask, rng=key, **kw)

    def merged(key):
        plain = lora.merge_adapters(model)  # once per RL step in a merged scheme
        return merged_sampler(nnx.split(plain)[1], ids, mask, rng=key, **kw)

    times = {"applied": [], "merged": []}
    outs = {}
    for r in range(args.rounds + 1):
        for name, fn in (("applied", applied), ("merged", merged)):
            t0 = time.perf_counter()
            out = fn(jax.random.key(r))
            jax.block_until_ready(out.tokens)
            if r:  # round 0 compiles
                times[name].append(time.perf_counter() - t0)
            outs[name] = np.asarray(out.tokens)
    result = {k: round(statistics.median(v), 3) for k, v in times.items()}
    result["same_tokens_last_round"] = bool(np.array_equal(outs["applied"], outs["merged"]))
    result["rank"], result["rounds"] = args.rank, args.rounds
    print(json.dumps(result))


if __name__ == "__main__":
    main()
