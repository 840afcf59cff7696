"""Sampling + scoring of prompt batches (stages 2-3), and validation during training: pooled
`val/accuracy` plus, per data source, `val/<data_source>/mean@n` and `pass@n` (verl reports
`val-core/<data_source>/acc/mean@n`). The standalone evaluation command is `htpo_jax.evaluate`."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from htpo_jax.distributed import score_lockstep
from htpo_jax.rollout import EngineConfig, generate
from htpo_jax.sharding import to_host


@dataclasses.dataclass(frozen=True)
class Scored:
    """Responses of P prompts x G samples (rows i*G .. i*G+G-1 are prompt i), on the host."""

    prompt_ids: np.ndarray  # [P, Lp] int32, left padded
    prompt_mask: np.ndarray  # [P, Lp]
    tokens: np.ndarray  # [P*G, R] int32
    response_mask: np.ndarray  # [P*G, R] int32
    lengths: np.ndarray  # [P*G]
    finished: np.ndarray  # [P*G] bool: ended with EOS
    reward: np.ndarray  # [P*G] float32: verifier score (+ overlong penalty)
    score: np.ndarray  # [P*G] float32: verifier score alone
    acc: np.ndarray  # [P*G] bool
    n: int  # G
    pred: tuple[str, ...] = ()  # [P*G] the verifier's extracted answers (for maj@k)
    texts: tuple[str, ...] = ()  # [P*G] decoded responses


def stop_tokens(tokenizer) -> tuple[int, ...]:
    """EOS ids: the tokenizer's eos plus the chat end-of-turn token when the vocabulary has it."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and no known end-of-turn token")
    return tuple(sorted(ids))


def pad_id(tokenizer) -> int:
    return (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_tokens(tokenizer)[0]
    )


def engine_config(r) -> EngineConfig | str:
    """The `generate(engine=...)` argument for a `RolloutConfig`."""
    if r.engine == "static":
        return "static"
    return EngineConfig(max_num_seqs=r.max_num_seqs, page_size=r.page_size,
                        num_pages=r.num_pages, kv_memory_fraction=r.kv_memory_fraction,
                        steps_per_call=r.steps_per_call)  # fmt: skip


def sample_and_score(
    model, tokenizer, batch, cfg, *, rng, n, temperature, top_p, top_k, pool=None
) -> Scored:
    """Generate n responses per prompt of `batch` (a data.PromptBatch), decode and score them.

    The engine (rollout.engine = paged) decodes at most `rollout.max_num_seqs` responses at
    once; the static sampler is called on that many responses at a time.
    """
    r = cfg.rollout
    n_prompts = batch.input_ids.shape[0]
    per_call = max(r.max_num_seqs // n, 1) if r.max_num_seqs else n_prompts
    if r.engine == "paged":  # the engine bounds the live rows itself: one call
        per_call = n_prompts
    parts = []
    for i, start in enumerate(range(0, n_prompts, per_call)):
        sl = slice(start, start + per_call)
        ro = generate(
            model,
            batch.input_ids[sl],
            batch.attention_mask[sl],
            max_new_tokens=r.max_response_length,
            rng=jax.random.fold_in(rng, i),
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            greedy=temperature <= 0,
            eos_token_id=stop_tokens(tokenizer),
            pad_token_id=pad_id(tokenizer),
            engine=engine_config(r),
        )
        parts.append(to_host(ro))
    ro = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    lengths = np.asarray(ro.lengths)
    texts = tokenizer.batch_decode(
        [row[:length] for row, length in zip(np.asarray(ro.tokens), lengths, strict=True)],
        skip_special_tokens=True,
    )
    truths = [gt for gt in batch.ground_truth for _ in range(n)]
    sources = [src for src in batch.data_source for _ in range(n)]
    # Each host scores its shard, each row by its data_source's reward; all hosts get the same
    # rewards (multi-host lockstep).
    reward, scored = score_lockstep(texts, truths, lengths, cfg, pool=pool, data_sources=sources)
    return Scored(
        prompt_ids=np.asarray(batch.input_ids),
        prompt_mask=np.asarray(batch.attention_mask),
        tokens=np.asarray(ro.tokens),
        response_mask=np.asarray(ro.response_mask),
        lengths=lengths,
        finished=np.asarray(ro.finished),
        reward=np.asarray(reward, np.float32),
        score=np.asarray(scored.score, np.float32),
        acc=np.asarray(scored.acc, bool),
        n=n,
        pred=tuple(scored.pred),
        texts=tuple(texts),
    )


def validate(model, tokenizer, dataset, cfg, *, rng, pool=None) -> dict[str, float]:
    """val/accuracy (mean over prompts and their val_n samples), val/pass@k, val/response_length,
    and per data source val/<source>/mean@n (and pass@n when n > 1)."""
    r = cfg.rollout
    accs, lengths, sources = [], [], []
    for i, batch in enumerate(dataset.iter_batches(cfg.data.val_batch_size)):
        s = sample_and_score(
            model,
            tokenizer,
            batch,
            cfg,
            rng=jax.random.fold_in(rng, i),
            n=r.val_n,
            temperature=r.val_temperature,
            top_p=r.val_top_p,
            top_k=r.val_top_k,
            pool=pool,
        )
        accs.append(s.acc.reshape(-1, r.val_n))
        lengths.append(s.lengths)
        sources += batch.data_source
    acc = np.concatenate(accs)  # [prompts, val_n]
    out = {
        "val/accuracy": float(acc.mean()),
        "val/response_length": float(np.concatenate(lengths).mean()),
    }
    if r.val_n > 1:
        out[f"val/pass@{r.val_n}"] = float(acc.any(-1).mean())
    sources = np.asarray(sources)
    for source in sorted(set(sources.tolist())):
        a = acc[sources == source]
        out[f"val/{source}/mean@{r.val_n}"] = float(a.mean())
        if r.val_n > 1:
            out[f"val/{source}/pass@{r.val_n}"] = float(a.any(-1).mean())
    return out
