"""Stages 2-3 of an RL step, ROLLOUT and REWARD: n sampled responses per prompt of a batch,
decoded and scored (`sample_and_score` -> `Scored`, on the host), plus `stop_tokens` (the EOS ids
every caller of the sampler shares; the pad id is `models.hf_io.pad_id`) and `engine_config`
(RolloutConfig -> the sampler's `engine`). Validation (stage 8) is `validation.validate`.

`score_lockstep`: each host scores its own contiguous shard of the decoded responses; the
results are all-gathered, so every host holds the same rewards and takes the same decisions
(dynamic-sampling keep masks, number of rounds), and a reward time-out has one verdict."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np

from htpo_jax.infra.distributed import HostSync, needs_sync
from htpo_jax.infra.sharding import to_host
from htpo_jax.models.hf_io import pad_id
from htpo_jax.rollout import EngineConfig


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
    log_probs: np.ndarray | None = None  # [P*G, R] float32: the sampler's (behaviour) log-probs
    version: np.ndarray | None = None  # [P*G, R] int32: the policy version of each token


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


def engine_config(r) -> EngineConfig | str:
    """The `generate(engine=...)` argument for a `RolloutConfig`."""
    if r.engine == "static":
        return "static"
    return EngineConfig(max_num_seqs=r.max_num_seqs, page_size=r.page_size,
                        num_pages=r.num_pages, kv_memory_fraction=r.kv_memory_fraction,
                        cpu_kv_budget_gib=r.cpu_kv_budget_gib,
                        steps_per_call=r.steps_per_call,
                        work_stealing=r.work_stealing)  # fmt: skip


def sample_and_score(
    sampler, params, tokenizer, batch, cfg, *, rng, n, temperature, top_p, top_k, pools=None
) -> Scored:
    """Generate n responses per prompt of `batch` (a data.PromptBatch) with `sampler`
    (a `rollout.Sampler`) under `params`, decode and score them.

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
        ro = sampler(
            params,
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
    return score_rollout(
        batch, np.asarray(ro.tokens), np.asarray(ro.response_mask), np.asarray(ro.lengths),
        np.asarray(ro.finished), tokenizer, cfg, n=n, pools=pools, sync=sampler.sync,
        log_probs=np.asarray(ro.log_probs),
    )  # fmt: skip


def score_rollout(batch, tokens, response_mask, lengths, finished, tokenizer, cfg, *, n: int,
                  pools=None, sync=None, log_probs=None, version=None) -> Scored:  # fmt: skip
    """Decode and score `n` responses per prompt of `batch` (a data.PromptBatch): host arrays
    [B*n, R] of tokens / response mask / log-probs (and per-token policy versions), [B*n]
    lengths and finished flags (ended with EOS)."""
    texts = tokenizer.batch_decode(
        [row[:length] for row, length in zip(tokens, lengths, strict=True)],
        skip_special_tokens=True,
    )
    truths = [gt for gt in batch.ground_truth for _ in range(n)]
    sources = [src for src in batch.data_source for _ in range(n)]
    # Each host scores its shard, each row by its data_source's reward; all hosts get the same
    # rewards (multi-host lockstep).
    reward, scored = score_lockstep(
        texts, truths, lengths, cfg, pools=pools, data_sources=sources, sync=sync
    )
    return Scored(
        prompt_ids=np.asarray(batch.input_ids),
        prompt_mask=np.asarray(batch.attention_mask),
        tokens=tokens,
        response_mask=response_mask,
        lengths=lengths,
        finished=finished,
        reward=np.asarray(reward, np.float32),
        score=np.asarray(scored.score, np.float32),
        acc=np.asarray(scored.acc, bool),
        n=n,
        pred=tuple(scored.pred),
        texts=tuple(texts),
        log_probs=log_probs,
        version=version,
    )


# ---------------------------------------------------------------- lockstep scoring
def shard_bounds(n: int, n_hosts: int, host: int) -> tuple[int, int]:
    """Rows [lo, hi) of n that `host` scores: contiguous, sizes differ by at most one chunk."""
    per = math.ceil(n / n_hosts) if n else 0
    return min(host * per, n), min((host + 1) * per, n)


def score_lockstep(
    solutions, ground_truths, response_lengths, cfg, pools=None, stage="reward", data_sources=None,
    sync: HostSync | None = None,
):  # fmt: skip
    """`rewards.compute_rewards` of all N responses, each scored on exactly one host.

    With `data_sources`, each row is scored by the reward its source routes to
    (`rewards.routing.routed_rewards`); without, by `algorithm.reward_fn`.

    Returns the same (reward [N], RewardBatch) on every host: the array fields of the batch are
    all-gathered, list fields (the extracted answers) too. One process: compute_rewards itself.
    """
    from htpo_jax.rewards import compute_rewards
    from htpo_jax.rewards.routing import routed_rewards

    def score(sl: slice):
        sols, truths = list(solutions[sl]), list(ground_truths[sl])
        lengths = np.asarray(response_lengths)[sl]
        if data_sources is None:
            return compute_rewards(sols, truths, lengths, cfg, pools=pools)
        return routed_rewards(sols, truths, list(data_sources[sl]), lengths, cfg, pools=pools)

    n_hosts = jax.process_count()
    if n_hosts == 1:
        return score(slice(None))
    lo, hi = shard_bounds(len(solutions), n_hosts, jax.process_index())
    reward, scored = score(slice(lo, hi))
    arrays = {"reward": np.asarray(reward)}
    lists = {}
    for f in dataclasses.fields(scored):
        v = getattr(scored, f.name)
        if isinstance(v, np.ndarray):
            arrays[f.name] = v
        elif isinstance(v, list | tuple):
            lists[f.name] = list(v)
    arrays["lists_json"] = np.frombuffer(json.dumps(lists).encode(), np.uint8)
    got = needs_sync(sync, "reward scoring").allgather_arrays(stage, **arrays)
    merged_lists = {k: [] for k in lists}
    for blob in got.pop("lists_json"):
        for k, v in json.loads(blob.tobytes().decode()).items():
            merged_lists[k].extend(v)
    merged = {k: np.concatenate(v) for k, v in got.items()}
    reward = merged.pop("reward")
    return reward, dataclasses.replace(scored, **merged, **merged_lists)
