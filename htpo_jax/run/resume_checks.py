"""What a resume must agree with: every checkpoint carries the id of the run that wrote it
(`new_run_id`), `checkpoint.resume=false` into a directory holding another run's checkpoints is
refused (`check_fresh_start`), and `config_drift` lists the keys that change results and differ
between the saved and the new config; `resume` applies all of it to a restore."""

from __future__ import annotations

import logging
import time
import uuid

from htpo_jax.run.preflight import LaunchError
from htpo_jax.run.watch import all_finite

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- run identity
def new_run_id() -> str:
    """A fresh run id: the local time as YYYYmmdd-HHMMSS and 8 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def check_fresh_start(checkpoint_dir: str, steps: list[int]) -> None:
    """`checkpoint.resume=false` must not write into a directory holding another run's saves."""
    if steps:
        raise LaunchError(
            f"checkpoint.resume=false but {checkpoint_dir} holds checkpoints of an earlier run "
            f"(steps {steps}); use a new trainer.output_dir (or checkpoint.dir), delete them, "
            "or set checkpoint.resume=true"
        )


# ---------------------------------------------------------------- config drift
# Keys that do not change what a run computes: where things go, how often to log/save/validate,
# how the work is laid out on devices or processes, and how long to run.
DRIFT_IGNORED = (
    "mesh.",
    "rollout.placement",  # where rollouts run does not change what they sample
    "rollout.devices_per_host",
    "checkpoint.",
    "trainer.output_dir",
    "trainer.total_steps",
    "trainer.val_every",
    "trainer.val_before_train",
    "trainer.log_every",
    "trainer.logger",  # the old name of trainer.loggers, in checkpoints written before it
    "trainer.loggers",
    "trainer.wandb_",
    "trainer.progress_bar",
    "trainer.max_nonfinite_steps",
    "trainer.collapse_window",
    "model.remat",
    "model.attention_chunk_size",
    "model.attention_impl",  # how attention is computed, not what
    "rollout.max_num_seqs",
    "algorithm.reward_num_workers",
    "algorithm.reward_timeout_s",
    "data.val_files",
    "data.val_batch_size",
    "rollout.val_",
    "distributed.",  # how many processes and who starts them, not what they compute
    "trainer.collective_timeout_s",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def config_drift(saved: dict, new: dict) -> list[str]:
    """'key: old -> new' for each results-changing key that differs (keys absent on one side,
    e.g. added in a later version, are not counted)."""
    a, b = _flat(saved), _flat(new)
    out = []
    for key in sorted(a.keys() & b.keys()):
        if any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in DRIFT_IGNORED):
            continue
        if a[key] != b[key]:
            out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return out


def check_drift(saved: dict | None, new: dict, allow: bool, step: int) -> None:
    """LaunchError when results-changing keys differ between the checkpoint's config and the new one
    (only a warning with checkpoint.allow_config_change); no saved config, no check."""
    if not saved:
        return
    drift = config_drift(saved, new)
    if not drift:
        return
    msg = f"config differs from the one checkpoint {step} was trained with: " + "; ".join(drift)
    if allow:
        log.warning("%s (allowed by checkpoint.allow_config_change)", msg)
        return
    raise LaunchError(
        msg + ". Set checkpoint.allow_config_change=true to resume anyway, or use a new "
        "trainer.output_dir"
    )


def resume(ckpt, state, cfg):
    """(state, extra) to resume from, or None for a fresh start; refuses mixed runs, config drift
    and another model with one line (LaunchError / CheckpointMismatch)."""
    steps = ckpt.all_steps()
    if not cfg.checkpoint.resume:
        check_fresh_start(cfg.checkpoint_dir, steps)
        return None
    new = cfg.to_dict()

    def check_extra(step, extra):
        check_drift(extra.get("config"), new, cfg.checkpoint.allow_config_change, step)

    def verify(restored):
        return None if all_finite(restored.params) else "holds non-finite parameters"

    return ckpt.restore_latest(state, check_extra=check_extra, verify=verify)
