"""`python -m htpo_jax.train [--config FILE] [--set key=value ...]`: a whole HTPO (or baseline) run.

With no arguments it runs `configs/default.yaml`: the small arithmetic model in `assets/`, on CPU.
Both are files of the source checkout; an install without them (a wheel) says which are missing.

The loop has purejaxrl's shape: what never changes during a run (config, mesh, graphdef, sampler,
compiled update, data stream, checkpointer, logger, reward pool) is a frozen `Components`, built
once by `components()` (a context manager that closes them, also on errors); what changes is the
`TrainState`, passed explicitly: `state, metrics = rl_step(c, state, step)`. One RL step goes
through the stages of docs/DESIGN.md: DATA, ROLLOUT, REWARD, FILTER, ADVANTAGE, OLD LOG-PROBS,
UPDATE (`stages.py`, typed data between them: `Scored` -> `KeptGroups` -> `UpdateBatch`), then
LOG / EVAL / SAVE (`run_loop`, below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from htpo_jax.infra import distributed as dist
from htpo_jax.infra import placement
from htpo_jax.infra.sharding import is_main_process
from htpo_jax.models.hf_io import load_tokenizer
from htpo_jax.rewards import RewardPools
from htpo_jax.rewards.routing import UnknownDataSource, check_sources
from htpo_jax.rl.train_step import (
    StepConfig,
    TrainState,
    jit_apply_grads,
    jit_micro_grads,
)
from htpo_jax.rl.validation import validate
from htpo_jax.rollout import Sampler
from htpo_jax.run import adapters, async_rl, lock, preflight, resume_checks, stages, watch
from htpo_jax.run.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    CheckpointSaveError,
    StorageError,
    check_shared_dir,
)
from htpo_jax.run.config import Config, cli_config, dump_yaml
from htpo_jax.run.data import DataError, DataState, PromptStream, train_stream, val_dataset
from htpo_jax.run.metrics import MetricsLogger, WandbOptions, plain
from htpo_jax.run.policy import build_model, make_optimizer
from htpo_jax.run.stages import Components, Programs, SamplingExhausted, Services

log = logging.getLogger("htpo_jax.train")
# The default run lives in the repository, next to the package, not inside it: a wheel (or any
# install that is not a source checkout) has neither of these.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
# What configs/default.yaml reads (tests/test_train.py keeps this list equal to the file's paths).
DEFAULT_RUN_FILES = (
    "configs/default.yaml",
    "assets/arith_model/",
    "assets/arith/train.jsonl",
    "assets/arith/val.jsonl",
)


def no_default_run_message() -> str:
    """The one line of a `python -m htpo_jax.train` without --config where the default run's
    files are not installed (a wheel ships the package only)."""
    return (
        f"no --config given, and the default run is not installed here: it needs "
        f"{', '.join(DEFAULT_RUN_FILES)} of a source checkout (looked for {DEFAULT_CONFIG}), "
        "which a wheel does not ship; run from a clone of the repository (pip install -e .), "
        "or pass --config FILE / --set model.path=... data.train_files=..."
    )


class StageClock:
    """Wall time of named stages (`time/<stage>`) and of the whole step since creation."""

    def __init__(self):
        self.start, self.times = time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.times[f"time/{name}"] = time.perf_counter() - t0

    def total(self) -> dict:
        """The stage times and `time/step`, the time since the clock was made."""
        return {**self.times, "time/step": time.perf_counter() - self.start}


def rl_step(c: Components, state: TrainState, step: int) -> tuple[TrainState, dict]:
    """One RL step: stages 1-7 of DESIGN.md, top to bottom (`stages.py`); returns (new state,
    metrics). The TrainState is donated to the update: use only the returned one. With
    `trainer.async_mode` on: `rl_step_async`."""
    if c.services.rollouts is not None:
        return rl_step_async(c, state, step)
    clock = StageClock()
    key = jax.random.fold_in(state.rng, step)
    p, s, cfg = c.programs, c.services, c.cfg
    spec = stages.MicroSpec.of(cfg, p.mesh)
    with clock("rollout_reward_filter"):  # 1 DATA, 2 ROLLOUT, 3 REWARD, 4 FILTER
        kept, stats = stages.collect(p, s, cfg, state.params, key)
    s.sync.barrier(f"old log-probs step {step}")
    with clock("old_log_prob"):  # 5 ADVANTAGE, 6 OLD LOG-PROBS
        batch, batch_stats, mean_ent = prepare_batch(c, state.params, kept, spec, step)
    with clock("update"):  # 7 UPDATE
        state, update_metrics = stages.update_all(p, state, batch, spec, cfg.optim, cfg.rollout.n)
    metrics = {**stats, **batch_stats, **update_metrics, "train/entropy": mean_ent}
    return state, {**metrics, **clock.total()}


def prepare_batch(c: Components, params, kept, spec, step: int):
    """Stages 5-6b of step `step`: advantages, row balance, old (and reference) log-probs under
    `params`, and, when the kept groups carry their sampling policy (an asynchronous run), the
    off-policy weights (`stages.off_policy_weights`; none in a synchronous step). Returns (the
    `UpdateBatch`, its balance / IS metrics, the mean entropy)."""
    p, cfg = c.programs, c.cfg
    off_policy = c.services.rollouts is not None
    batch = stages.build_batch(kept, cfg.rollout.n, cfg.algorithm, cfg.data, off_policy=off_policy)
    batch, balance_stats = stages.balance_rows(batch, p.mesh, cfg)
    batch, mean_ent = stages.old_logprobs(p, params, batch, spec)
    batch, is_stats = stages.off_policy_weights(batch, step - 1, cfg.algorithm)  # version step-1
    return batch, {**balance_stats, **is_stats}, mean_ent


def rl_step_async(c: Components, state: TrainState, step: int) -> tuple[TrainState, dict]:
    """One asynchronous RL step (`run/async_rl.py`): the kept groups come from rollouts made
    with earlier weights (stage 6b weighs their tokens, `stages.off_policy_weights`), and a
    piece of rollout work for later steps runs during the update."""
    clock = StageClock()
    p, s, cfg = c.programs, c.services, c.cfg
    ro, spec = s.rollouts, stages.MicroSpec.of(cfg, p.mesh)
    with clock("rollout_reward_filter"):  # what is not ready yet of 1-4
        kept, stats = ro.take(state.params, state.rng, step)
    s.sync.barrier(f"old log-probs step {step}")
    with clock("old_log_prob"):
        batch, batch_stats, mean_ent = prepare_batch(c, state.params, kept, spec, step)
    with clock("update"):
        if step < cfg.trainer.total_steps:  # the last step has no next step to sample for
            ro.start(state.params, state.rng, step)  # before the update donates the weights
        u0 = time.perf_counter()
        state, per_update = stages.dispatch_updates(p, state, batch, spec, cfg.optim, cfg.rollout.n)
        ro.run_overlapped()  # colocated: the host side overlaps the dispatched update
        jax.block_until_ready(state.params)
        window = (u0, time.perf_counter())
        update_metrics = stages.update_metrics(per_update)
    with clock("rollout_join"):
        overlap = ro.join(window)
    metrics = {**stats, **batch_stats, **update_metrics, "train/entropy": mean_ent}
    return state, {**metrics, **overlap, **clock.total()}


# ---------------------------------------------------------------- setup
@contextlib.contextmanager
def components(
    cfg: Config, mesh: jax.sharding.Mesh, sync: dist.HostSync
) -> Iterator[tuple[Components, TrainState]]:
    """Builds the run's `Components` and its first (or restored) `TrainState`; on leaving, also
    on an error, closes the reward pool, the logger and the checkpointer (which first waits for a
    save in flight, except after a collective timeout: the other hosts are gone)."""
    with contextlib.ExitStack() as stack:
        out = Path(cfg.trainer.output_dir)
        rollout_mesh = rollout_mesh_of(cfg)
        # Nothing is written to the output dir until the launch validated (the run dirs are
        # checked writable here, by a probe that leaves nothing behind).
        preflight.prelaunch(cfg, main_process=is_main_process())
        tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        stream, val_set = train_stream(cfg, tokenizer), val_dataset(cfg, tokenizer)  # before model
        check_sources([r.data_source for r in stream.dataset.rows], cfg, "data.train_files")
        if val_set is not None:
            check_sources([r.data_source for r in val_set.rows], cfg, "data.val_files")
        model = build_model(cfg, mesh)  # with the configured LoRA adapters, if any
        lora_on = adapters.lora_spec(cfg) is not None
        sampler, vocab_size = Sampler.from_model(model, sync=sync), model.cfg.vocab_size
        graphdef, params = nnx.split(model)
        del model  # the TrainState holds the one copy of the parameters
        # with LoRA the reference is the base itself (adapters off, stages.reference_params)
        use_copy = cfg.algorithm.use_kl_loss and not lora_on
        ref_params = jax.tree.map(jnp.copy, params) if use_copy else None
        tx, step_cfg = make_optimizer(cfg), StepConfig.from_config(cfg)
        state = TrainState.create(params, tx, seed=cfg.trainer.seed, sc=step_cfg)  # LoRA: adapters
        if is_main_process():  # one lock per run, held by the process that writes the shared files
            stack.enter_context(lock.OutputLock(out))
            # Two runs with their own output dirs but one checkpoint.dir would replace each
            # other's checkpoints: the checkpoint dir is locked too (the same lock file when it
            # is the output dir itself).
            stack.enter_context(lock.OutputLock(cfg.checkpoint_dir, preflight.checkpoint_key(cfg)))
        check_shared_dir(cfg.checkpoint_dir, sync)
        ckpt = Checkpointer.from_config(cfg)
        stack.push(
            lambda _t, e, _tb: None if isinstance(e, dist.CollectiveTimeout) else ckpt.close()
        )
        start, run_id = 0, resume_checks.new_run_id()
        restored = resume_checks.resume(ckpt, adapters.checkpoint_view(state, cfg), cfg)
        if restored is not None:
            extra = restored[1]
            state = adapters.from_checkpoint_view(restored[0], state.params, cfg)
            start, data_state = int(extra["step"]), DataState.from_json(extra["data"])
            run_id = extra.get("run_id", run_id)
            stream = PromptStream(stream.dataset, cfg.trainer.seed, cfg.data.shuffle, data_state)
            log.info("resumed from %s at step %d", cfg.checkpoint_dir, start)
        if is_main_process():
            (out / "config.yaml").write_text(dump_yaml(cfg))
        pools = stack.enter_context(RewardPools())  # every verifier's workers, if any
        logger = MetricsLogger(
            out,
            resume_step=start if restored else None,
            loggers=cfg.trainer.loggers,
            wandb=wandb_options(cfg, run_id, out),
        )
        stack.callback(logger.close)
        programs = Programs(
            mesh=mesh,
            tokenizer=tokenizer,
            graphdef=graphdef,
            sampler=sampler,
            ref_params=ref_params,
            step_cfg=step_cfg,
            update_fns=(
                jit_micro_grads(graphdef, step_cfg),
                jit_apply_grads(tx, sc=step_cfg),
            ),
        )
        services = Services(
            stream=stream,
            val_set=val_set,
            ckpt=ckpt,
            logger=logger,
            pools=pools,
            watch=watch.StepWatch(cfg, vocab_size),
            sync=sync,
        )
        if cfg.trainer.async_mode != "off":
            rollouts = async_rl.MODES[cfg.trainer.async_mode](programs, services, cfg, rollout_mesh)
            services = dataclasses.replace(services, rollouts=rollouts)
        yield (
            Components(
                cfg=cfg, programs=programs, services=services, run_id=run_id, start_step=start
            ),  # fmt: skip
            state,
        )


def rollout_mesh_of(cfg: Config):
    """The rollout's own mesh (rollout.placement=separate), else None."""
    return placement.meshes(cfg)[1] if cfg.rollout.placement == "separate" else None


# ---------------------------------------------------------------- 8 LOG / EVAL / SAVE
def wandb_options(cfg: Config, run_id: str, out: Path) -> WandbOptions:
    """The W&B run of this training run: its id is the run id the checkpoints carry (a resume
    continues it), its config the resolved config."""
    t = cfg.trainer
    return WandbOptions(
        project=t.wandb_project,
        name=t.wandb_run_name or Path(out).resolve().name,
        run_id=run_id,
        tags=t.wandb_tags,
        config=cfg.to_dict(),
    )


def run_validation(c: Components, params) -> dict:
    """Validation metrics of `params` (`validation.validate`, the same key every time), or {}."""
    p, s = c.programs, c.services
    if s.val_set is None:
        return {}
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(c.cfg.trainer.seed), 2**30)  # same every time
    out = validate(p.sampler, params, p.tokenizer, s.val_set, c.cfg, rng=key, pools=s.pools)
    return {**out, "time/val": time.perf_counter() - t0}


def save(c: Components, state: TrainState, step: int) -> None:
    """Checkpoint `state` with what resuming needs: the step, the data position, the config."""
    ro = c.services.rollouts  # asynchronous: drawn but untrained prompts are drawn again
    data = c.services.stream.state if ro is None else ro.data_state()
    extra = {
        "step": step,
        "data": data.to_json(),
        "config": c.cfg.to_dict(),
        "run_id": c.run_id,
    }
    c.services.watch.save(step, adapters.checkpoint_view(state, c.cfg), extra, c.services.ckpt)


class RunStops(dist.StopSignals):
    """`StopSignals` that knows when the run is still starting (loading, restoring, the first
    validation): a signal then says at once that the run stops before its first step, where the
    plain message promised a save "at the end of this step" that was a minute or more away."""

    starting = True

    def _on_signal(self, signum, frame) -> None:
        if self.reason is None and self.starting:
            self.reason = name = signal.Signals(signum).name
            print(
                f"{name} received during start-up: stopping before the first step (nothing "
                f"new to save); {name} again stops at once",
                file=sys.stderr,
                flush=True,
            )
            return
        super()._on_signal(signum, frame)


def _summary(c: Components, first_val, last_val, steps: int, stopped, metrics, **extra) -> dict:
    return {
        "val_accuracy_before": (first_val or {}).get("val/accuracy"),
        "val_accuracy_after": (last_val or {}).get("val/accuracy"),
        "steps": steps,
        "stopped": stopped,
        # only the main process writes metrics.jsonl (MetricsLogger)
        "metrics": str(c.services.logger.path) if c.services.logger.enabled else None,
        "checkpoints": c.cfg.checkpoint_dir,
        "last": plain({k: v for k, v in metrics.items() if isinstance(v, int | float | np.number)}),
        **extra,
    }


def run_loop(c: Components, state: TrainState, stops: dist.StopSignals) -> dict:
    """Steps `start_step + 1 .. total_steps` (or validation only), logging, validating and
    saving as configured; returns the run's summary. A stop that came during start-up ends the
    run before its first step (`saved` False in the summary); a run already at
    `trainer.total_steps` does nothing (`already_complete`)."""
    t, total = c.cfg.trainer, c.cfg.trainer.total_steps
    logger, ckpt = c.services.logger, c.services.ckpt
    first_val = last_val = stopped = None
    step, metrics = c.start_step, {}
    early = lambda reason: _summary(c, first_val, None, c.start_step, reason, {}, saved=False)
    if not t.val_only and c.start_step >= total:
        return _summary(c, None, None, c.start_step, None, {}, already_complete=True)
    # Every host asks (a collective), so all of them skip the steps together.
    if not t.val_only and (reason := stops.should_stop(c.start_step)):
        return early(reason)
    if t.val_only:  # eval.sh's mode: validate the current (restored) policy, then stop
        last_val = run_validation(c, state.params)
        logger.log(c.start_step, last_val)
        total = c.start_step
    elif c.start_step == 0 and t.val_before_train:
        first_val = run_validation(c, state.params)
        logger.log(0, first_val)
        if reason := stops.should_stop(c.start_step):
            return early(reason)
    if isinstance(stops, RunStops):
        stops.starting = False  # from here a signal means: save after this step
    bar = tqdm(
        range(c.start_step + 1, total + 1),
        initial=c.start_step,
        total=total,
        desc="htpo",
        disable=not t.progress_bar,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    for step in bar:
        state, metrics = rl_step(c, state, step)
        if step == total or (t.val_every and step % t.val_every == 0):
            last_val = run_validation(c, state.params)
            metrics.update(last_val)
        metrics["train/lr_step"] = int(state.step)
        if step % t.log_every == 0 or step == total or "val/accuracy" in metrics:
            logger.log(step, metrics)
        c.services.watch.after_step(step, metrics, ckpt)  # non-finite stop, collapse, disk
        stopped = stops.should_stop(step)
        if ckpt.should_save(step, last=step == total) or stopped:
            save(c, state, step)
        val = (last_val or first_val or {}).get("val/accuracy", float("nan"))
        # a stream step may finish no group of its own (its buffer was full): no accuracy then
        acc = metrics.get("train/accuracy", float("nan"))
        bar.set_postfix(acc=f"{acc:.2f}", val=f"{val:.2f}")
        if stopped:
            bar.close()
            break
    return _summary(c, first_val, last_val, step if stopped else total, stopped, metrics)


def train(cfg: Config) -> dict:
    """The whole run; returns a summary (accuracy before/after, paths)."""
    mesh = placement.meshes(cfg)[0]  # with separate placement: the trainer's devices
    # The run's host sync points (one namespace, one deadline), shared by every stage.
    sync = dist.HostSync("train", cfg.trainer.collective_timeout_s)
    stops = RunStops(sync=sync)  # SIGTERM / SIGINT: save at the end of the step, exit 0
    try:  # the handlers go back also when setup or a step raises
        with jax.set_mesh(mesh), components(cfg, mesh, sync) as (c, state):
            return run_loop(c, state, stops)
    finally:
        stops.close()


def print_summary(summary: dict) -> None:
    """The run's last lines on stdout (main process only: see `main`)."""
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
    step, where = summary["steps"], summary["checkpoints"]
    if summary.get("already_complete"):
        print(
            f"run already complete at step {step} (trainer.total_steps reached; checkpoints in "
            f"{where}): nothing to do; raise trainer.total_steps to train on, or use a new "
            "trainer.output_dir"
        )
        return
    if summary.get("stopped") and summary.get("saved") is False:
        again = "start it" if step == 0 else f"resume from step {step}"
        print(
            f"stopped during start-up ({summary['stopped']}): no step run, nothing saved; run "
            f"the same command to {again}"
        )
        return
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
    """The command line: config from `--config` / `--set`, then `train`; bad input exits 2 with
    one line, a stopped run 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = any(a == "--config" or a.startswith("--config=") for a in argv)
    if not given and DEFAULT_CONFIG.exists():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    cfg = cli_config(argv, description=__doc__.splitlines()[0])
    if not given and not DEFAULT_CONFIG.exists() and not cfg.model.path:
        # An install without the repository (a wheel): "model.path is empty" would not say why.
        print(f"error: {no_default_run_message()}", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    preflight.setup_logging()
    dist.initialize(cfg.distributed)  # before any JAX backend is touched
    try:
        summary = train(cfg)
    except (preflight.LaunchError, DataError, CheckpointMismatch, UnknownDataSource) as e:
        # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (dist.SetupError, StorageError, placement.PlacementError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (watch.TrainingStopped, CheckpointSaveError, SamplingExhausted) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except dist.CollectiveTimeout as e:
        # Other hosts are stuck or gone: JAX's exit-time shutdown barrier would wait for them.
        print(f"error: {e}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)  # the run's locks were released when its components closed
    if is_main_process():
        print_summary(summary)
    elif summary.get("stopped"):  # every host's log says why it exited; the summary is process 0's
        step = summary["steps"]
        when = (
            f"during start-up at step {step}"
            if summary.get("saved") is False
            else f"after step {step}"
        )
        print(
            f"stopped {when} ({summary['stopped']}); process "
            f"{jax.process_index()} exits, process 0 prints the summary"
        )
    return summary


if __name__ == "__main__":
    main()
