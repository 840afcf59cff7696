"""Share of computed token slots that are padding: every row padded to the step's longest response
(micro_batch_size rows per micro-batch) vs token-budget micro-batches (htpo_jax/packing.py).

    python benchmarks/padding_fraction.py [--json out.json]

Two batches: (1) the default task, sampled for real with the embedded model (configs/default.yaml,
one generation round); (2) a synthetic DAPO-like step of 512 responses (one paper mini-batch):
prompts ~ lognormal around 150 tokens, responses ~ lognormal around 3k tokens, ~4% cut at
20,480, laid out as the paper config does (32 batch shards, budget 22,528 tokens per shard).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from htpo_jax.rl import packing


def fractions(pmask_np, ext_n, r_cap, *, multiple, max_tokens, shards):
    """(before, after, compiled widths) for prompts [N, P] (mask) and response extents [N]."""
    n, p = pmask_np.shape
    real = int(pmask_np.sum() + ext_n.sum())
    r_step = min(math.ceil(max(ext_n.max(), 1) / multiple) * multiple, r_cap)
    before = 1 - real / (n * (p + r_step))
    micros = packing.plan(
        ext_n, p, max_tokens=max_tokens, shards=shards, multiple=multiple, cap=r_cap
    )
    after = 1 - real / packing.computed_tokens(micros, p)
    return before, after, sorted({m.width for m in micros}), len(micros)


def default_task(max_tokens: int):
    import jax
    from flax import nnx

    from htpo_jax.models.hf_io import from_pretrained, load_tokenizer
    from htpo_jax.rl.sample import sample_and_score
    from htpo_jax.rollout import Sampler
    from htpo_jax.run.config import load_config
    from htpo_jax.run.data import train_stream

    cfg = load_config("configs/default.yaml")
    tok = load_tokenizer(cfg.model.path)
    model = from_pretrained(cfg.model.path, dtype=jax.numpy.float32)
    batch = train_stream(cfg, tok, None).next_batch(cfg.data.gen_batch_size)
    r = cfg.rollout
    s = sample_and_score(
        Sampler.from_model(model), nnx.state(model), tok, batch, cfg, rng=jax.random.key(0),
        n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
    )  # fmt: skip
    pmask = np.repeat(s.prompt_mask, r.n, axis=0)
    ext = packing.response_extent(s.response_mask)
    out = fractions(
        pmask, ext, r.max_response_length, multiple=cfg.data.pad_to_multiple,
        max_tokens=max_tokens, shards=1,
    )  # fmt: skip
    return out, {
        "rows": len(ext),
        "mean_response": float(ext.mean()),
        "max_response": int(ext.max()),
    }


def dapo_like(seed: int = 0):
    rng = np.random.default_rng(seed)
    n, cap, multiple = 512, 20480, 64
    prompt_len = np.minimum(rng.lognormal(np.log(150), 0.5, n).astype(int) + 20, 2048)
    ext = np.minimum(rng.lognormal(np.log(3000), 0.9, n).astype(int) + 50, cap)
    p = math.ceil(prompt_len.max() / multiple) * multiple
    pmask = (np.arange(p)[None] >= p - prompt_len[:, None]).astype(np.int32)
    out = fractions(pmask, ext, cap, multiple=multiple, max_tokens=22528, shards=32)
    info = {"rows": n, "mean_response": float(ext.mean()), "cut_at_cap": float((ext == cap).mean())}
    return out, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--default-max-tokens", type=int, default=2048)
    args = ap.parse_args()
    report = {}
    for name, (res, info) in (
        ("default task", default_task(args.default_max_tokens)),
        ("DAPO-like (synthetic)", dapo_like()),
    ):
        before, after, widths, n_micro = res
        report[name] = dict(info, padding_before=before, padding_after=after, widths=widths)
        print(
            f"{name:24s} rows {info['rows']:4d}  padding: padded-to-longest {before:6.1%}  "
            f"token-budget {after:6.1%}  ({n_micro} micro-batches, widths {widths})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
