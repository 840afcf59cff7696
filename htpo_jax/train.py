"""`python -m htpo_jax.train [--config FILE] [--set key=value ...]`: a whole HTPO (or baseline) run.

With no arguments it runs `configs/default.yaml`: the small arithmetic model in `assets/`, on CPU.
One RL step goes through the stages of docs/DESIGN (headers below): DATA, ROLLOUT, REWARD,
FILTER, ADVANTAGE, OLD LOG-PROBS, UPDATE, LOG / EVAL / SAVE.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from htpo_jax import advantages as adv_lib
from htpo_jax import balance, guards, packing
from htpo_jax import distributed as dist
from htpo_jax.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    CheckpointSaveError,
    StorageError,
)
from htpo_jax.config import Config, cli_config, dump_yaml
from htpo_jax.data import DataError, DataState, PromptStream, train_stream, val_dataset
from htpo_jax.eval import Scored, sample_and_score, validate
from htpo_jax.metrics import MetricsLogger, plain
from htpo_jax.models.hf_io import decoder_options, from_pretrained, load_tokenizer
from htpo_jax.rewards import RewardPool
from htpo_jax.rewards.routing import UnknownDataSource, check_sources
from htpo_jax.sharding import is_main_process, logical_sharding, make_mesh, to_host
from htpo_jax.train_step import (
    StepConfig,
    TrainState,
    UpdateBatch,
    jit_apply_grads,
    jit_micro_grads,
    jit_update,
    make_optimizer,
    packed_update,
    score_responses,
)

log = logging.getLogger("htpo_jax.train")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class SamplingExhausted(RuntimeError):
    """Dynamic sampling found too few prompts with mixed outcomes."""


@dataclasses.dataclass
class Run:
    """Everything a step needs; built once by `setup`."""

    cfg: Config
    model: nnx.Module  # holds the current parameters for the sampler
    graphdef: nnx.GraphDef
    tokenizer: object
    mesh: jax.sharding.Mesh
    state: TrainState
    ref_params: nnx.State | None
    update_fn: object
    step_cfg: StepConfig
    stream: object
    val_set: object
    ckpt: Checkpointer
    logger: MetricsLogger
    pool: RewardPool | None
    start_step: int
    packed_fns: tuple | None = None  # (micro_grads, apply_grads) with optim.max_tokens_per_micro
    run_id: str = ""  # written into every checkpoint (guards.py)
    watch: guards.StepWatch | None = None


# ---------------------------------------------------------------- 1 DATA / 2 ROLLOUT / 3 REWARD
def sample_round(run: Run, key, n_prompts: int) -> Scored:
    r = run.cfg.rollout
    nnx.update(run.model, run.state.params)
    batch = run.stream.next_batch(n_prompts)
    return sample_and_score(
        run.model,
        run.tokenizer,
        batch,
        run.cfg,
        rng=key,
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        pool=run.pool,
    )


# ---------------------------------------------------------------- 4 FILTER
def collect(run: Run, key) -> tuple[dict, dict]:
    """Draw generation batches until `train_batch_size` prompt groups survive the dynamic-sampling
    filter; return the kept groups (host arrays, prompts left-padded to one width) and stats."""
    cfg, g = run.cfg, run.cfg.rollout.n
    a, need = cfg.algorithm, cfg.data.train_batch_size
    kept: list[tuple[Scored, np.ndarray]] = []
    n_kept, rounds, all_acc, all_len, all_reward, all_fin = 0, 0, [], [], [], []
    while n_kept < need:
        if a.dynamic_sampling and a.max_num_gen_batches and rounds >= a.max_num_gen_batches:
            raise SamplingExhausted(
                f"dynamic sampling kept {n_kept} of the {need} prompts a step needs after "
                f"{rounds} generation batches (algorithm.max_num_gen_batches); every other group "
                f"was all-correct or all-wrong. Raise algorithm.max_num_gen_batches or "
                f"data.gen_batch_size, or use easier/harder data."
            )
        size = cfg.data.gen_batch_size if a.dynamic_sampling else need
        s = sample_round(run, jax.random.fold_in(key, rounds), size)
        rounds += 1
        all_acc.append(s.acc)
        all_len.append(s.lengths)
        all_reward.append(s.reward)
        all_fin.append(s.finished)
        metric = (s.acc if a.dynamic_sampling_metric == "acc" else s.score).reshape(-1, g)
        keep = (
            np.asarray(adv_lib.dynamic_sampling_keep(metric))
            if a.dynamic_sampling
            else (np.ones(metric.shape[0], bool))
        )
        kept.append((s, np.flatnonzero(keep)))
        n_kept += int(keep.sum())
    # Every host derived `keep` from the same all-gathered rewards (dist.score_lockstep); a
    # disagreement here is a bug, reported at once instead of a hang in the next collective.
    dist.agree("filter decision", [rounds, n_kept])
    width = max(s.prompt_ids.shape[1] for s, _ in kept)
    parts: dict[str, list] = {k: [] for k in ("pids", "pmask", "tokens", "rmask", "reward", "acc")}
    for s, idx in kept:
        pad = ((0, 0), (width - s.prompt_ids.shape[1], 0))
        rows = (idx[:, None] * g + np.arange(g)).reshape(-1)
        parts["pids"].append(np.repeat(np.pad(s.prompt_ids, pad)[idx], g, 0))
        parts["pmask"].append(np.repeat(np.pad(s.prompt_mask, pad)[idx], g, 0))
        parts["tokens"].append(s.tokens[rows])
        parts["rmask"].append(s.response_mask[rows])
        parts["reward"].append(s.reward[rows])
        parts["acc"].append(s.acc[rows])
    out = {k: np.concatenate(v)[: need * g] for k, v in parts.items()}
    lengths = np.concatenate(all_len)
    stats = {
        "train/accuracy": np.concatenate(all_acc).mean(),
        "train/reward_mean": np.concatenate(all_reward).mean(),
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "response_length/min": lengths.min(),
        "response_length/clip_ratio": 1.0 - np.concatenate(all_fin).mean(),
        "filter/gen_batches": rounds,
        "filter/kept_prompt_frac": n_kept
        / (rounds * (cfg.data.gen_batch_size if a.dynamic_sampling else need)),
    }
    return out, stats


# ---------------------------------------------------------------- 5 ADVANTAGE
def build_batch(run: Run, kept: dict) -> UpdateBatch:
    cfg, g = run.cfg, run.cfg.rollout.n
    reward, acc = kept["reward"].reshape(-1, g), kept["acc"].reshape(-1, g)
    advantages = np.asarray(adv_lib.grpo_advantages(reward)).reshape(-1)
    hard = np.repeat(np.asarray(adv_lib.hard_prompts(acc, cfg.algorithm.difficulty_threshold)), g)
    # Response slots past the longest response carry nothing: cut them, rounded up for few shapes.
    mult = cfg.data.pad_to_multiple
    r = min(
        int(np.ceil(max(kept["rmask"].sum(-1).max(), 1) / mult) * mult), kept["tokens"].shape[1]
    )
    tokens, rmask = kept["tokens"][:, :r], kept["rmask"][:, :r]
    rmask_f = rmask.astype(np.float32)
    return UpdateBatch(
        input_ids=np.concatenate([kept["pids"], tokens], 1).astype(np.int32),
        attention_mask=np.concatenate([kept["pmask"], rmask], 1).astype(np.int32),
        response_mask=rmask_f,
        old_log_prob=np.zeros_like(rmask_f),
        ref_log_prob=np.zeros_like(rmask_f),
        advantages=(advantages[:, None] * rmask_f).astype(np.float32),
        hard=hard,
        correct=kept["acc"].astype(bool),
        prompt_len=kept["pids"].shape[1],
    )


# ---------------------------------------------------------------- 6 OLD LOG-PROBS
def batch_shards(run: Run) -> int:
    return int(run.mesh.shape["data"] * run.mesh.shape["fsdp"])


def micro_plan(run: Run, batch: UpdateBatch) -> list[packing.Micro]:
    """Token-budget micro-batches of `batch` (packing.py): longest rows first, bucketed widths."""
    return packing.plan(
        packing.response_extent(batch.response_mask),
        batch.prompt_len,
        max_tokens=run.cfg.optim.max_tokens_per_micro,
        shards=batch_shards(run),
        multiple=run.cfg.data.pad_to_multiple,
        cap=run.cfg.rollout.max_response_length,
    )


def old_logprobs_packed(run: Run, batch: UpdateBatch) -> tuple[UpdateBatch, float]:
    """`old_logprobs` over token-budget micro-batches (each padded to its own width bucket)."""
    t, m = run.step_cfg.temperature, batch.response_mask
    old, ref, ent = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    for micro in micro_plan(run, batch):
        mb = packing.gather(batch, micro)
        ids, mask = put(run, mb.input_ids), put(run, mb.attention_mask)
        scored = score_responses(run.graphdef, run.state.params, ids, mask, mb.prompt_len, t)
        lp, e = to_host(scored)
        packing.scatter(lp, micro, old)
        packing.scatter(e, micro, ent)
        if run.ref_params is not None:
            ref_lp = score_responses(run.graphdef, run.ref_params, ids, mask, mb.prompt_len, t)
            packing.scatter(to_host(ref_lp[0]), micro, ref)
    ref = ref * m if run.ref_params is not None else batch.ref_log_prob
    mean_ent = float((ent * m).sum() / max(m.sum(), 1))
    return batch.replace(old_log_prob=old * m, ref_log_prob=ref), mean_ent


def old_logprobs(run: Run, batch: UpdateBatch) -> tuple[UpdateBatch, float]:
    """Old (and reference) log-probs in micro-batch chunks; returns the batch and mean entropy."""
    if run.cfg.optim.max_tokens_per_micro:
        return old_logprobs_packed(run, batch)
    mb = run.cfg.optim.micro_batch_size
    t = run.step_cfg.temperature
    old, ref, ent = [], [], []
    for i in range(0, batch.input_ids.shape[0], mb):
        ids, mask = (
            put(run, batch.input_ids[i : i + mb]),
            put(run, batch.attention_mask[i : i + mb]),
        )
        scored = score_responses(run.graphdef, run.state.params, ids, mask, batch.prompt_len, t)
        lp, e = to_host(scored)
        old.append(lp)
        ent.append(e)
        if run.ref_params is not None:
            ref_lp = score_responses(run.graphdef, run.ref_params, ids, mask, batch.prompt_len, t)
            ref.append(to_host(ref_lp[0]))
    m = batch.response_mask
    old = np.concatenate(old) * m
    ref = np.concatenate(ref) * m if ref else batch.ref_log_prob
    mean_ent = float((np.concatenate(ent) * m).sum() / max(m.sum(), 1))
    return batch.replace(old_log_prob=old, ref_log_prob=ref), mean_ent


def put(run: Run, x, lead: int = 0):
    """Host array -> device, batch axis (after `lead` leading axes) over data x fsdp."""
    names = (None,) * lead + ("act_batch",) + (None,) * (x.ndim - lead - 1)
    return dist.put_global(x, logical_sharding(names, run.mesh, x.shape))


# ---------------------------------------------------------------- 7 UPDATE
def update_packed(run: Run, mini: UpdateBatch) -> dict:
    """One optimizer update over the token-budget micro-batches of one mini-batch."""
    grads_fn, apply_fn = run.packed_fns
    micros = [
        jax.tree.map(lambda x: put(run, x), packing.gather(mini, m)) for m in micro_plan(run, mini)
    ]
    rmask = np.asarray(mini.response_mask)
    num_tokens, num_seqs = np.float32(rmask.sum()), np.float32((rmask > 0).any(-1).sum())
    zeros = lambda: jax.tree.map(jnp.zeros_like, run.state.params)
    run.state, metrics = packed_update(
        run.state, micros, num_tokens, num_seqs, grads_fn, apply_fn, zeros
    )
    return metrics


def update_all(run: Run, batch: UpdateBatch) -> dict:
    o, g = run.cfg.optim, run.cfg.rollout.n
    n_rows = batch.input_ids.shape[0]
    mini_rows = o.mini_batch_size * g
    per_update = []
    for _ in range(o.ppo_epochs):
        for start in range(0, n_rows, mini_rows):
            mini = jax.tree.map(lambda x, s=start: x[s : s + mini_rows], batch)
            if o.max_tokens_per_micro:
                per_update.append(update_packed(run, mini))
                continue
            # [mini_rows, ...] -> [n_micro, micro, ...]
            mini = jax.tree.map(
                lambda x: put(run, x.reshape(-1, o.micro_batch_size, *x.shape[1:]), lead=1), mini
            )
            run.state, metrics = run.update_fn(run.state, mini)
            per_update.append(metrics)
    metrics = jax.tree.map(lambda *xs: np.mean([np.asarray(x) for x in xs]), *per_update)
    # a count, not a mean: updates of this step skipped for a non-finite loss or gradient norm
    metrics["nonfinite_skipped"] = sum(int(m["nonfinite_skipped"]) for m in per_update)
    metrics = {(k if k.startswith("group_frac") else f"train/{k}"): v for k, v in metrics.items()}
    return metrics


def rl_step(run: Run, step: int) -> dict:
    times = {}
    t0 = time.perf_counter()
    key = jax.random.fold_in(run.state.rng, step)
    kept, stats = collect(run, key)
    times["time/rollout_reward_filter"] = time.perf_counter() - t0
    dist.barrier(f"old log-probs step {step}")
    t1 = time.perf_counter()
    batch = build_batch(run, kept)
    if run.cfg.data.balance_batch:  # shards: the batch axis is split over data x fsdp
        shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
        batch, balance_metrics = balance.balance_batch(batch, shards, run.cfg)
        stats.update(balance_metrics)
    batch, mean_ent = old_logprobs(run, batch)
    times["time/old_log_prob"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    metrics = update_all(run, batch)
    times["time/update"] = time.perf_counter() - t2
    times["time/step"] = time.perf_counter() - t0
    return {**stats, **metrics, "train/entropy": mean_ent, **times}


# ---------------------------------------------------------------- setup, 8 LOG / EVAL / SAVE
def setup(cfg: Config, mesh: jax.sharding.Mesh) -> Run:
    # Nothing is written to the output dir until the launch has validated (guards.py).
    out = Path(cfg.trainer.output_dir)
    guards.prelaunch(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
    stream, val_set = train_stream(cfg, tokenizer), val_dataset(cfg, tokenizer)  # before the model
    check_sources([r.data_source for r in stream.dataset.rows], cfg, "data.train_files")
    if val_set is not None:
        check_sources([r.data_source for r in val_set.rows], cfg, "data.val_files")
    model = from_pretrained(
        cfg.model.path,
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        mesh=mesh,
        **decoder_options(cfg.model),
    )
    graphdef, params = nnx.split(model)
    ref_params = jax.tree.map(jnp.copy, params) if cfg.algorithm.use_kl_loss else None
    updates_per_step = cfg.optim.ppo_epochs * (
        cfg.data.train_batch_size // cfg.optim.mini_batch_size
    )
    tx = make_optimizer(cfg.optim, cfg.trainer.total_steps, updates_per_step)
    state = TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key(cfg.trainer.seed),
    )
    step_cfg = StepConfig.from_config(cfg)
    if is_main_process():  # one lock per run, held by the process that writes the shared files
        guards.OutputLock(out).acquire()
    dist.set_collective_timeout(cfg.trainer.collective_timeout_s)
    dist.check_shared_dir(cfg.checkpoint_dir)
    ckpt = Checkpointer.from_config(cfg)
    start, run_id = 0, guards.new_run_id()
    restored = guards.resume(ckpt, state, cfg)
    if restored is not None:
        state, extra = restored
        start, data_state = int(extra["step"]), DataState.from_json(extra["data"])
        run_id = extra.get("run_id", run_id)
        stream = PromptStream(stream.dataset, cfg.trainer.seed, cfg.data.shuffle, data_state)
        log.info("resumed from %s at step %d", cfg.checkpoint_dir, start)
    if is_main_process():
        (out / "config.yaml").write_text(dump_yaml(cfg))
    pool = None
    if cfg.algorithm.reward_num_workers:
        pool = RewardPool(
            cfg.algorithm.reward_fn,
            cfg.algorithm.reward_num_workers,
            cfg.algorithm.reward_timeout_s,
        )
    return Run(
        cfg=cfg,
        model=model,
        graphdef=graphdef,
        tokenizer=tokenizer,
        mesh=mesh,
        state=state,
        ref_params=ref_params,
        update_fn=jit_update(graphdef, tx, step_cfg),
        step_cfg=step_cfg,
        stream=stream,
        val_set=val_set,
        ckpt=ckpt,
        pool=pool,
        start_step=start,
        packed_fns=(jit_micro_grads(graphdef, step_cfg), jit_apply_grads(tx))
        if cfg.optim.max_tokens_per_micro
        else None,
        logger=MetricsLogger(
            out,
            resume_step=start if restored else None,
            tensorboard="tensorboard" in cfg.trainer.logger,
        ),
        run_id=run_id,
        watch=guards.StepWatch(cfg, model.cfg.vocab_size),
    )


def run_validation(run: Run) -> dict:
    if run.val_set is None:
        return {}
    t0 = time.perf_counter()
    nnx.update(run.model, run.state.params)
    key = jax.random.fold_in(jax.random.key(run.cfg.trainer.seed), 2**30)  # same every time
    out = validate(run.model, run.tokenizer, run.val_set, run.cfg, rng=key, pool=run.pool)
    return {**out, "time/val": time.perf_counter() - t0}


def train(cfg: Config) -> dict:
    """The whole run; returns a summary (accuracy before/after, paths)."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    stops = dist.StopSignals()  # SIGTERM / SIGINT: save at the end of the step, exit 0
    try:  # the handlers go back also when setup or a step raises
        stopped = None
        with jax.set_mesh(mesh):
            run = setup(cfg, mesh)
            t, total = cfg.trainer, cfg.trainer.total_steps
            first_val = last_val = None
            if t.val_only:  # eval.sh's mode: validate the current (restored) policy, then stop
                last_val = run_validation(run)
                run.logger.log(run.start_step, last_val)
                total = run.start_step
            elif run.start_step == 0 and t.val_before_train:
                first_val = run_validation(run)
                run.logger.log(0, first_val)
            bar = tqdm(
                range(run.start_step + 1, total + 1),
                initial=run.start_step,
                total=total,
                desc="htpo",
                disable=not t.progress_bar,
                dynamic_ncols=True,
                file=sys.stderr,
            )
            metrics: dict = {}
            for step in bar:
                metrics = rl_step(run, step)
                if step == total or (t.val_every and step % t.val_every == 0):
                    last_val = run_validation(run)
                    metrics.update(last_val)
                metrics["train/lr_step"] = int(run.state.step)
                if step % t.log_every == 0 or step == total or "val/accuracy" in metrics:
                    run.logger.log(step, metrics)
                run.watch.after_step(step, metrics, run.ckpt)  # non-finite stop, collapse, disk
                stopped = stops.should_stop(step)
                if run.ckpt.should_save(step, last=step == total) or stopped:
                    run.watch.save(
                        step,
                        run.state,
                        {
                            "step": step,
                            "data": run.stream.state.to_json(),
                            "config": cfg.to_dict(),
                            "run_id": run.run_id,
                        },
                        run.ckpt,
                    )
                bar.set_postfix(
                    acc=f"{metrics['train/accuracy']:.2f}",
                    val=f"{(last_val or first_val or {}).get('val/accuracy', float('nan')):.2f}",
                )
                if stopped:
                    bar.close()
                    break
            run.ckpt.close()
            run.logger.close()
            if run.pool is not None:
                run.pool.close()
    finally:
        stops.close()
    summary = {
        "val_accuracy_before": (first_val or {}).get("val/accuracy"),
        "val_accuracy_after": (last_val or {}).get("val/accuracy"),
        "steps": total if not stopped else step,
        "stopped": stopped,
        "metrics": str(run.logger.path),
        "checkpoints": cfg.checkpoint_dir,
        "last": plain({k: v for k, v in metrics.items() if isinstance(v, int | float | np.number)}),
    }
    return summary


def print_summary(summary: dict) -> None:
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
    print(
        f"\nval/accuracy: {fmt(summary['val_accuracy_before'])} (start) -> "
        f"{fmt(summary['val_accuracy_after'])} (after step {summary['steps']})"
    )
    print(f"metrics:     {summary['metrics']}")
    print(f"checkpoints: {summary['checkpoints']}")
    if summary.get("stopped"):
        print(
            f"stopped after step {summary['steps']} ({summary['stopped']}): checkpoint "
            f"{summary['steps']} saved in {summary['checkpoints']}; run the same command to resume"
        )


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and DEFAULT_CONFIG.exists():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    cfg = cli_config(argv, description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    guards.setup_logging()
    dist.initialize(cfg.distributed)  # before any JAX backend is touched
    try:
        summary = train(cfg)
    except (guards.LaunchError, DataError, CheckpointMismatch, UnknownDataSource) as e:
        # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (dist.SetupError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (guards.TrainingStopped, CheckpointSaveError, SamplingExhausted) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except dist.CollectiveTimeout as e:
        # Other hosts are stuck or gone: JAX's exit-time shutdown barrier would wait for them.
        print(f"error: {e}", file=sys.stderr, flush=True)
        guards.release_locks()
        logging.shutdown()
        os._exit(1)
    finally:
        guards.release_locks()
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
