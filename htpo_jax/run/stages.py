"""The stages of one RL step (docs/DESIGN.md, stages 1-7) and the typed data between them.

`train.rl_step` calls them in order: `collect` (1 DATA, 2 ROLLOUT, 3 REWARD, 4 FILTER: generation
rounds of `Scored` until enough prompt groups survive, as `KeptGroups`), `build_batch` (5
ADVANTAGE: an `UpdateBatch`), `balance_rows`, `old_logprobs` (6 OLD LOG-PROBS) and `update_all`
(7 UPDATE). Each takes what it reads: the run's `Programs` (what computes, never changed), its
`Services` (live objects: data stream, reward pools, host sync) and the config sections, and
returns new values; the only thing they advance is the data stream's position
(`Services.stream`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.infra import distributed as dist
from htpo_jax.infra.sharding import logical_sharding, to_host
from htpo_jax.models import lora
from htpo_jax.rewards import RewardPools
from htpo_jax.rl import advantages as adv_lib
from htpo_jax.rl import balance, offpolicy, packing
from htpo_jax.rl.sample import Scored, sample_and_score
from htpo_jax.rl.train_step import (
    StepConfig,
    TrainState,
    UpdateBatch,
    packed_update,
    score_responses,
    split_trainable,
)
from htpo_jax.rollout import Sampler
from htpo_jax.rollout.engine import batch_shards  # data x fsdp
from htpo_jax.run.checkpoint import Checkpointer
from htpo_jax.run.config import Config
from htpo_jax.run.data import PromptStream
from htpo_jax.run.metrics import MetricsLogger
from htpo_jax.run.watch import StepWatch


class SamplingExhausted(RuntimeError):
    """Dynamic sampling found too few prompts with mixed outcomes."""


@dataclasses.dataclass(frozen=True)
class Programs:
    """What computes, built once and never changed: the mesh, the tokenizer, the model's
    structure and sampler, the frozen reference policy, the update's settings and functions."""

    mesh: jax.sharding.Mesh
    tokenizer: object
    graphdef: nnx.GraphDef
    sampler: Sampler  # samples under the params it is called with (no second model copy)
    ref_params: nnx.State | None  # the frozen reference policy (use_kl_loss)
    step_cfg: StepConfig
    update_fns: tuple  # (micro_grads, apply_grads): the one update path (`update_mini`)


@dataclasses.dataclass(frozen=True)
class Services:
    """The run's live objects, each with state of its own, closed with the run (`components()`).

    The data position is owned by `stream` (a `PromptStream` advances its `DataState` as it hands
    out batches; checkpoints save `stream.state`), not by the `TrainState`: the stream is the one
    place that reads the dataset, and resuming rebuilds it at the saved position.
    """

    stream: PromptStream
    val_set: object  # data.PromptDataset or None
    ckpt: Checkpointer
    logger: MetricsLogger
    pools: RewardPools  # verifier worker pools
    watch: StepWatch  # non-finite / collapse / disk checks, and the finite-only save
    sync: dist.HostSync  # the run's host sync points (every host decides alike)
    rollouts: object = None  # trainer.async_mode != off: the `run.async_rl` driver


@dataclasses.dataclass(frozen=True)
class Components:
    """What a run builds once and never replaces (`components()` builds and closes it): the
    config, the `Programs`, the `Services`, the run's identity and where it starts."""

    cfg: Config
    programs: Programs
    services: Services
    run_id: str  # written into every checkpoint (run/resume_checks.py)
    start_step: int  # 0, or the restored checkpoint's step


@dataclasses.dataclass(frozen=True)
class MicroSpec:
    """How a batch is cut into micro-batches (`micro_plan`), from the keys the plan reads."""

    max_tokens: int  # optim.max_tokens_per_micro (0: fixed-size micro-batches)
    micro_rows: int  # optim.micro_batch_size
    multiple: int  # data.pad_to_multiple
    cap: int  # rollout.max_response_length
    shards: int  # batch shards of the mesh (data x fsdp)

    @classmethod
    def of(cls, cfg: Config, mesh) -> MicroSpec:
        """The spec of a run config on `mesh`."""
        o = cfg.optim
        return cls(o.max_tokens_per_micro, o.micro_batch_size, cfg.data.pad_to_multiple,
                   cfg.rollout.max_response_length, batch_shards(mesh))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class KeptGroups:
    """The prompt groups kept by the filter, one row per response: rows i*G .. i*G+G-1 are the
    G responses of kept prompt i (host arrays)."""

    prompt_ids: np.ndarray  # [N, P] int32, left padded to the widest round's width
    prompt_mask: np.ndarray  # [N, P]
    tokens: np.ndarray  # [N, R] int32
    response_mask: np.ndarray  # [N, R]
    reward: np.ndarray  # [N] float32
    acc: np.ndarray  # [N] bool
    behaviour_log_prob: np.ndarray  # [N, R] float32: the sampler's log-probs
    version: np.ndarray  # [N, R] int32: the policy version that sampled each token

    @classmethod
    def of_round(cls, s: Scored, keep_idx: np.ndarray, width: int) -> KeptGroups:
        """The kept prompts `keep_idx` of one round, prompts left-padded to `width`."""
        g = s.n
        pad = ((0, 0), (width - s.prompt_ids.shape[1], 0))
        rows = (keep_idx[:, None] * g + np.arange(g)).reshape(-1)  # [kept * G]
        zeros = np.zeros(s.tokens.shape, np.float32)
        return cls(
            prompt_ids=np.repeat(np.pad(s.prompt_ids, pad)[keep_idx], g, 0),
            prompt_mask=np.repeat(np.pad(s.prompt_mask, pad)[keep_idx], g, 0),
            tokens=s.tokens[rows],
            response_mask=s.response_mask[rows],
            reward=s.reward[rows],
            acc=s.acc[rows],
            behaviour_log_prob=(zeros if s.log_probs is None else s.log_probs)[rows],
            version=(zeros.astype(np.int32) if s.version is None else s.version)[rows],
        )

    def pad_prompts(self, width: int) -> KeptGroups:
        """The same groups with prompts left-padded to `width` (>= their own width)."""
        pad = ((0, 0), (width - self.prompt_ids.shape[1], 0))
        return dataclasses.replace(self, prompt_ids=np.pad(self.prompt_ids, pad),
                                   prompt_mask=np.pad(self.prompt_mask, pad))  # fmt: skip

    @classmethod
    def concat(cls, parts: list[KeptGroups], rows: int) -> KeptGroups:
        """The first `rows` rows of `parts`, in order."""
        fields = (f.name for f in dataclasses.fields(cls))
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts])[:rows] for k in fields})


# ---------------------------------------------------------------- 1 DATA / 2 ROLLOUT / 3 REWARD
def sample_round(p: Programs, s: Services, cfg: Config, params, key, n_prompts: int,
                 version: int = 0) -> Scored:  # fmt: skip
    """The next `n_prompts` prompts of the stream, `rollout.n` responses each, scored; every
    token is marked as sampled by policy `version`."""
    r = cfg.rollout
    batch = s.stream.next_batch(n_prompts)
    sc = sample_and_score(
        p.sampler,
        params,
        p.tokenizer,
        batch,
        cfg,
        rng=key,
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        pools=s.pools,
    )
    return dataclasses.replace(sc, version=np.full(sc.tokens.shape, version, np.int32))


# ---------------------------------------------------------------- 4 FILTER
def collect(p: Programs, s: Services, cfg: Config, params, key,
            version: int = 0) -> tuple[KeptGroups, dict]:  # fmt: skip
    """Draw generation rounds until `train_batch_size` prompt groups survive the dynamic-sampling
    filter (groups whose rewards all agree carry no gradient); returns the kept groups and the
    rollout / filter statistics of every round drawn. `params` are policy `version`."""
    g = cfg.rollout.n
    a, need = cfg.algorithm, cfg.data.train_batch_size
    size = cfg.data.gen_batch_size if a.dynamic_sampling else need
    rounds: list[tuple[Scored, np.ndarray]] = []
    n_kept = 0
    while n_kept < need:
        if a.dynamic_sampling and a.max_num_gen_batches and len(rounds) >= a.max_num_gen_batches:
            raise SamplingExhausted(
                f"dynamic sampling kept {n_kept} of the {need} prompts a step needs after "
                f"{len(rounds)} generation batches (algorithm.max_num_gen_batches); every other "
                f"group was all-correct or all-wrong. Raise algorithm.max_num_gen_batches or "
                f"data.gen_batch_size, or use easier/harder data."
            )
        sc = sample_round(p, s, cfg, params, jax.random.fold_in(key, len(rounds)), size, version)
        metric = (sc.acc if a.dynamic_sampling_metric == "acc" else sc.score).reshape(-1, g)
        keep = (
            np.asarray(adv_lib.dynamic_sampling_keep(metric))
            if a.dynamic_sampling
            else np.ones(metric.shape[0], bool)
        )
        rounds.append((sc, np.flatnonzero(keep)))
        n_kept += int(keep.sum())
    # Every host derived `keep` from the same all-gathered rewards (sample.score_lockstep); a
    # disagreement here is a bug, reported at once instead of a hang in the next collective.
    s.sync.agree("filter decision", [len(rounds), n_kept])
    width = max(r.prompt_ids.shape[1] for r, _ in rounds)
    kept = KeptGroups.concat([KeptGroups.of_round(r, idx, width) for r, idx in rounds], need * g)
    return kept, round_stats([r for r, _ in rounds], n_kept, len(rounds) * size)


def round_stats(rounds: list[Scored], n_kept: int, n_drawn: int) -> dict:
    """Rollout / filter statistics of the generation rounds of a step (`n_kept` of `n_drawn`
    prompt groups survived the filter)."""
    every = lambda name: np.concatenate([getattr(r, name) for r in rounds])
    lengths = every("lengths")
    return {
        "train/accuracy": every("acc").mean(),
        "train/reward_mean": every("reward").mean(),
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "response_length/min": lengths.min(),
        "response_length/clip_ratio": 1.0 - every("finished").mean(),
        "filter/gen_batches": len(rounds),
        "filter/kept_prompt_frac": n_kept / max(n_drawn, 1),
    }


# ---------------------------------------------------------------- 5 ADVANTAGE
def build_batch(kept: KeptGroups, g: int, algorithm, data, off_policy: bool = False) -> UpdateBatch:
    """GRPO advantages and hard/easy flags of the kept groups (`g` = rollout.n responses per
    prompt; `algorithm.difficulty_threshold`), as one `UpdateBatch` (old and reference log-probs
    still zero) whose response slots end at the longest response, rounded up to
    `data.pad_to_multiple`. `off_policy`: with the behaviour log-probs and token versions
    (`off_policy_weights` reads them)."""
    reward, acc = kept.reward.reshape(-1, g), kept.acc.reshape(-1, g)  # [N] -> [groups, G]
    advantages = np.asarray(adv_lib.grpo_advantages(reward)).reshape(-1)
    hard = np.repeat(np.asarray(adv_lib.hard_prompts(acc, algorithm.difficulty_threshold)), g)
    # Response slots past the longest response carry nothing: cut them, rounded up for few shapes.
    mult = data.pad_to_multiple
    longest = max(kept.response_mask.sum(-1).max(), 1)
    r = min(int(np.ceil(longest / mult) * mult), kept.tokens.shape[1])
    tokens, rmask = kept.tokens[:, :r], kept.response_mask[:, :r]
    rmask_f = rmask.astype(np.float32)
    return UpdateBatch(
        input_ids=np.concatenate([kept.prompt_ids, tokens], 1).astype(np.int32),
        attention_mask=np.concatenate([kept.prompt_mask, rmask], 1).astype(np.int32),
        response_mask=rmask_f,
        old_log_prob=np.zeros_like(rmask_f),
        ref_log_prob=np.zeros_like(rmask_f),
        advantages=(advantages[:, None] * rmask_f).astype(np.float32),
        hard=hard,
        correct=kept.acc.astype(bool),
        prompt_len=kept.prompt_ids.shape[1],
        behaviour_log_prob=kept.behaviour_log_prob[:, :r] * rmask_f if off_policy else None,
        version=kept.version[:, :r] if off_policy else None,
    )


def balance_rows(batch: UpdateBatch, mesh, cfg: Config) -> tuple[UpdateBatch, dict]:
    """`data.balance_batch`: rows reordered so every batch shard gets a similar token count."""
    if not cfg.data.balance_batch:
        return batch, {}
    return balance.balance_batch(batch, batch_shards(mesh), cfg)


# ---------------------------------------------------------------- 6 OLD LOG-PROBS
def micro_plan(batch: UpdateBatch, spec: MicroSpec) -> list[packing.Micro]:
    """The micro-batches of `batch` (packing.py): with a token budget (`spec.max_tokens`) longest
    rows first at bucketed widths, else `spec.micro_rows` rows in order at the batch's full width
    (equal-width micro-batches). Scoring and update use the same plan."""
    if not spec.max_tokens:
        return packing.fixed(batch.input_ids.shape[0], spec.micro_rows,
                             batch.response_mask.shape[1])  # fmt: skip
    return packing.plan(
        packing.response_extent(batch.response_mask),
        batch.prompt_len,
        max_tokens=spec.max_tokens,
        shards=spec.shards,
        multiple=spec.multiple,
        cap=spec.cap,
    )


def old_logprobs(p: Programs, params, batch: UpdateBatch,
                 spec: MicroSpec) -> tuple[UpdateBatch, float]:  # fmt: skip
    """The batch with the policy's (and the reference's) log-probs of its response tokens,
    computed micro-batch by micro-batch; also the mean entropy over response tokens."""
    t, m = p.step_cfg.temperature, batch.response_mask
    old, ref, ent = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    ref_params = reference_params(p, params)

    for m_plan in micro_plan(batch, spec):
        mb = packing.gather(batch, m_plan)
        ids, mask = put(p.mesh, mb.input_ids), put(p.mesh, mb.attention_mask)
        lp, e = to_host(score_responses(p.graphdef, params, ids, mask, mb.prompt_len, t))
        packing.scatter(lp, m_plan, old)
        packing.scatter(e, m_plan, ent)
        if ref_params is not None:
            ref_lp = score_responses(p.graphdef, ref_params, ids, mask, mb.prompt_len, t)
            packing.scatter(to_host(ref_lp[0]), m_plan, ref)
    ref = ref * m if ref_params is not None else batch.ref_log_prob
    mean_ent = float((ent * m).sum() / max(m.sum(), 1))
    return batch.replace(old_log_prob=old * m, ref_log_prob=ref), mean_ent


def off_policy_weights(batch: UpdateBatch, version: int, algorithm) -> tuple[UpdateBatch, dict]:
    """Stage 6b (asynchronous steps): the batch's advantages times each token's truncated IS
    weight between the proximal policy (`old_log_prob`, policy `version`) and the behaviour
    policy that sampled it (`rl.offpolicy`; `algorithm.rollout_is`), and the staleness / IS
    metrics. The behaviour fields are dropped (they never go to the device)."""
    if batch.behaviour_log_prob is None:
        return batch, {}
    m = np.asarray(batch.response_mask)
    staleness = np.where(m > 0, version - np.asarray(batch.version), 0)
    w, metrics = offpolicy.is_weights(
        batch.old_log_prob, batch.behaviour_log_prob, staleness, m, algorithm.rollout_is,
        algorithm.rollout_is_cap,
    )  # fmt: skip
    rows = (m > 0).any(-1)
    metrics.update(offpolicy.staleness_histogram(staleness.max(-1)[rows]))
    advantages = offpolicy.apply(batch.advantages, w)
    return batch.replace(advantages=advantages, behaviour_log_prob=None, version=None), metrics


def reference_params(p: Programs, params):
    """The KL reference policy's parameters, or None when the KL loss is off: the frozen copy
    made at the start, or with LoRA the current base with the adapters switched off (no copy:
    the base never changes)."""
    if p.ref_params is not None or not (p.step_cfg.lora and p.step_cfg.use_kl_loss):
        return p.ref_params
    return lora.adapters_off(params)


def put(mesh, x, lead: int = 0):
    """Host array -> device, batch axis (after `lead` leading axes) over data x fsdp."""
    names = (None,) * lead + ("act_batch",) + (None,) * (x.ndim - lead - 1)
    return dist.put_global(x, logical_sharding(names, mesh, x.shape))


# ---------------------------------------------------------------- 7 UPDATE
def update_mini(p: Programs, state: TrainState, mini: UpdateBatch,
                spec: MicroSpec) -> tuple[TrainState, dict]:  # fmt: skip
    """One optimizer update from one PPO mini-batch (host arrays; TrainState donated)."""
    grads_fn, apply_fn = p.update_fns
    micros = [
        jax.tree.map(lambda x: put(p.mesh, x), packing.gather(mini, m))
        for m in micro_plan(mini, spec)
    ]
    rmask = np.asarray(mini.response_mask)
    num_tokens, num_seqs = np.float32(rmask.sum()), np.float32((rmask > 0).any(-1).sum())
    trainable = lambda: split_trainable(state.params, p.step_cfg)[0]  # the adapters with LoRA
    zeros = lambda: jax.tree.map(jnp.zeros_like, trainable())
    return packed_update(state, micros, num_tokens, num_seqs, grads_fn, apply_fn, zeros)


def update_all(p: Programs, state: TrainState, batch: UpdateBatch, spec: MicroSpec, optim,
               g: int) -> tuple[TrainState, dict]:  # fmt: skip
    """`optim.ppo_epochs` passes over the batch in mini-batches of `optim.mini_batch_size`
    prompts of `g` responses."""
    state, per_update = dispatch_updates(p, state, batch, spec, optim, g)
    return state, update_metrics(per_update)


def dispatch_updates(p: Programs, state: TrainState, batch: UpdateBatch, spec: MicroSpec, optim,
                     g: int) -> tuple[TrainState, list[dict]]:  # fmt: skip
    """`update_all`'s updates, dispatched (JAX runs them asynchronously): the new state and each
    update's metrics, still on the device (`update_metrics` reads them)."""
    o = optim
    n_rows, mini_rows = batch.input_ids.shape[0], o.mini_batch_size * g
    per_update = []
    for _ in range(o.ppo_epochs):
        for start in range(0, n_rows, mini_rows):
            mini = jax.tree.map(lambda x, s=start: x[s : s + mini_rows], batch)
            state, metrics = update_mini(p, state, mini, spec)
            per_update.append(metrics)
    return state, per_update


def update_metrics(per_update: list[dict]) -> dict:
    """The step's `train/*` metrics from its updates' metrics (waits for the updates)."""
    metrics = jax.tree.map(lambda *xs: np.mean([np.asarray(x) for x in xs]), *per_update)
    # a count, not a mean: updates of this step skipped for a non-finite loss or gradient norm
    metrics["nonfinite_skipped"] = sum(int(m["nonfinite_skipped"]) for m in per_update)
    return {(k if k.startswith("group_frac") else f"train/{k}"): v for k, v in metrics.items()}
