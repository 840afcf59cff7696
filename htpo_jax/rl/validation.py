"""The evaluation estimators and the trainer's validation (stage 8).

pass@k is the unbiased estimator of Chen et al. (2021): per problem with c of n samples correct,
1 - C(n-c, k) / C(n, k), averaged over problems. maj@k splits the n samples of a problem into
floor(n / k) disjoint groups of k (in sampling order), takes each group's most frequent extracted
answer (ties: the answer seen first; responses without an answer do not vote) and averages its
correctness: an unbiased estimate of the majority-vote accuracy of k samples.

`validate` is the trainer's validation (stage 8): `val/accuracy`, `val/pass@n` (the same
estimator at k = n) and per-source `val/<source>/mean@n`, with the same sampling settings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np

from htpo_jax.rl.sample import Scored, sample_and_score

NO_VOTE = {"", "[INVALID]", "[TIMEOUT]", "[ERROR]"}  # extracted "answers" that are not answers


# ---------------------------------------------------------------- the estimators
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct of n samples: 1 - C(n-c, k) / C(n, k),
    computed as a product so that it stays exact for large n (Chen et al. 2021)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(preds: Sequence[str], accs: Sequence[bool]) -> bool:
    """Is the most frequent answer of one group right? Ties go to the answer seen first."""
    votes = Counter(p for p in preds if p not in NO_VOTE)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(p for p in preds if votes.get(p) == top)
    return bool(accs[list(preds).index(winner)])


def maj_at_k(preds: Sequence[str], accs: Sequence[bool], k: int) -> float:
    """maj@k of one problem from its n samples: mean over floor(n / k) disjoint groups of k."""
    n = len(preds)
    if not 0 < k <= n:
        raise ValueError(f"maj@k needs 0 < k <= n, got k={k}, n={n}")
    groups = [slice(g * k, (g + 1) * k) for g in range(n // k)]
    return float(np.mean([majority_correct(preds[s], accs[s]) for s in groups]))


def summarize(records: list[dict], ks: Sequence[int]) -> dict[str, dict]:
    """Per data source: mean@n, pass@k, maj@k, mean length, truncation rate (records as in
    responses.jsonl; every problem must have the same number of samples)."""
    by_problem: dict[tuple, list[dict]] = {}
    for r in records:
        by_problem.setdefault((r["data_source"], r["file"], r["problem"]), []).append(r)
    out: dict[str, dict] = {}
    for source in sorted({key[0] for key in by_problem}):
        problems = [v for key, v in by_problem.items() if key[0] == source]
        n = len(problems[0])
        if any(len(p) != n for p in problems):
            raise ValueError(f"{source}: problems have different sample counts")
        acc = np.array([[r["acc"] for r in p] for p in problems], bool)  # [P, n]
        preds = [[r["pred"] for r in p] for p in problems]
        rows = [r for p in problems for r in p]
        out[source] = {
            "n": n,
            "problems": len(problems),
            f"mean@{n}": float(acc.mean()),
            "pass@k": {
                str(k): float(np.mean([pass_at_k(n, int(c), k) for c in acc.sum(1)]))
                for k in ks
                if k <= n
            },
            "maj@k": {
                str(k): float(np.mean([maj_at_k(p, a, k) for p, a in zip(preds, acc, strict=True)]))
                for k in ks
                if k <= n
            },
            "response_length_mean": float(np.mean([r["length"] for r in rows])),
            "truncation_rate": float(np.mean([not r["finished"] for r in rows])),
        }
    return out


# ---------------------------------------------------------------- validation during training
def sample_val(sampler, params, tokenizer, batch, cfg, *, rng, n, pools=None) -> Scored:
    """`sample_and_score` with the validation sampling settings (`rollout.val_temperature`,
    `val_top_p`, `val_top_k`): the evaluation command and the trainer's validation both."""
    r = cfg.rollout
    return sample_and_score(
        sampler, params, tokenizer, batch, cfg, rng=rng, n=n, temperature=r.val_temperature,
        top_p=r.val_top_p, top_k=r.val_top_k, pools=pools,
    )  # fmt: skip


def validate(sampler, params, tokenizer, dataset, cfg, *, rng, pools=None) -> dict[str, float]:
    """The trainer's validation (stage 8) of `params` on `dataset` (data.PromptDataset):
    val/accuracy (mean over prompts and their val_n samples), val/pass@val_n,
    val/response_length, and per data source val/<source>/mean@n (and pass@n when n > 1), with
    the sampling settings `rollout.val_*` (verl reports `val-core/<source>/acc/mean@n`)."""
    r = cfg.rollout
    accs, lengths, sources = [], [], []
    for i, batch in enumerate(dataset.iter_batches(cfg.data.val_batch_size)):
        s = sample_val(
            sampler, params, tokenizer, batch, cfg, rng=jax.random.fold_in(rng, i), n=r.val_n,
            pools=pools,
        )  # fmt: skip
        accs.append(s.acc.reshape(-1, r.val_n))
        lengths.append(s.lengths)
        sources += batch.data_source
    acc = np.concatenate(accs)  # [prompts, val_n]
    pass_n = lambda a: float(np.mean([pass_at_k(r.val_n, int(c), r.val_n) for c in a.sum(-1)]))
    out = {
        "val/accuracy": float(acc.mean()),
        "val/response_length": float(np.concatenate(lengths).mean()),
    }
    if r.val_n > 1:
        out[f"val/pass@{r.val_n}"] = pass_n(acc)
    sources = np.asarray(sources)
    for source in sorted(set(sources.tolist())):
        a = acc[sources == source]
        out[f"val/{source}/mean@{r.val_n}"] = float(a.mean())
        if r.val_n > 1:
            out[f"val/{source}/pass@{r.val_n}"] = pass_n(a)
    return out
