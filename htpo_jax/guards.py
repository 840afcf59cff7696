"""Run guards: what stops a run from losing work or hiding a failure.

Owns
- `LaunchError`: a problem the user can fix before anything runs; `train.main` prints it as one
  line and exits 2.
- `OutputLock`: one trainer per output dir (`<output_dir>/.htpo.lock` holds pid and host); a
  lock left by a dead process on this host is taken over with a warning.
- `new_run_id` / `check_run_owner`: every checkpoint carries the id of the run that wrote it, so
  `checkpoint.resume=false` into a directory holding another run's checkpoints is refused
  instead of mixing two runs.
- `config_drift`: the keys that change results and differ between the saved and the new config.
- `check_model_dir`: a local model/tokenizer directory lacks nothing (never a hub error).
- `NonFiniteWatch`, `CollapseWatch`: stop after `trainer.max_nonfinite_steps` RL steps in a row
  with a non-finite (skipped) update; warn, naming the metric, when the policy collapses.
- `all_finite`: a checkpoint or an export is never written with non-finite parameters.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

LOCK_NAME = ".htpo.lock"


class LaunchError(RuntimeError):
    """A launch problem described in one line (the user fixes the config, the files or the dir)."""


class TrainingStopped(RuntimeError):
    """The run stopped itself (diverged); the message is one line that says why."""


def is_url(path: str | os.PathLike) -> bool:
    """gs://, s3://, ...: remote paths are left as they are (no local resolution or locking)."""
    return "://" in str(path)


# ---------------------------------------------------------------- output-dir lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class OutputLock:
    """`<output_dir>/.htpo.lock`, created atomically (O_EXCL), removed by `release()`.

    A second trainer on the same dir gets a LaunchError naming the holder. A lock whose process
    is gone (same host, pid not running) is stale: it is taken over with a warning. A lock held
    from another host cannot be checked from here, so it is refused too (delete the file if that
    host's run is over). Remote (gs://) output dirs are not locked: O_EXCL has no meaning there.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = None if is_url(output_dir) else Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> OutputLock:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    self.held = True  # this process already holds it (train() called twice)
                    return self
                same_host = holder.get("host") == me["host"]
                pid = holder.get("pid")
                if same_host and isinstance(pid, int) and not _pid_alive(pid):
                    log.warning(
                        "taking over the stale lock %s of pid %d (no longer running)",
                        self.path,
                        pid,
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise LaunchError(
                    f"{self.path.parent} is in use by another trainer (pid {pid} on host "
                    f"{holder.get('host')}, lock {self.path}); use another trainer.output_dir, "
                    "or delete the lock file if that run is over"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            _held.append(self)
            atexit.register(self.release)  # also on an exception that ends the process
            return self
        raise LaunchError(f"could not take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # being written right now, or garbage: treated as held by an unknown

    def release(self) -> None:
        if self.held and self.path is not None:
            holder = self._holder()
            if holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_held: list[OutputLock] = []


def release_locks() -> None:
    """Release every lock this process holds (train.main calls it however the run ends)."""
    while _held:
        _held.pop().release()


# ---------------------------------------------------------------- run identity
def new_run_id() -> str:
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
    "checkpoint.",
    "trainer.output_dir",
    "trainer.total_steps",
    "trainer.val_every",
    "trainer.val_before_train",
    "trainer.log_every",
    "trainer.logger",
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


# ---------------------------------------------------------------- paths
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_dir(path: str, what: str = "model.path", tokenizer: bool = False) -> None:
    """A local HF directory with config.json and safetensors (or tokenizer files): one line
    naming what is missing. Nothing is ever downloaded, so a hub id is an error here too."""
    if not path:
        raise LaunchError(f"{what} is empty: set it to a local Hugging Face model directory")
    if is_url(path):
        return  # remote checkpoints are read by their own loaders
    p = Path(path)
    if not p.is_dir():
        raise LaunchError(f"{what}: {path} is not a directory (a local HF model dir is needed)")
    names = {f.name for f in p.iterdir()}
    if tokenizer:
        if not names & set(TOKENIZER_FILES):
            raise LaunchError(
                f"{what}: {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})"
            )
        return
    if "config.json" not in names:
        raise LaunchError(f"{what}: {path} has no config.json")
    if not any(n.endswith(".safetensors") for n in names):
        raise LaunchError(f"{what}: {path} has no *.safetensors weights")


# ---------------------------------------------------------------- finite / divergence / collapse
def all_finite(tree) -> bool:
    """True when every floating leaf of `tree` is finite (one device reduction per leaf)."""
    ok = True
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            ok = ok and bool(jnp.isfinite(leaf).all())
            if not ok:
                return False
    return ok


def _finite(x) -> bool:
    try:
        return math.isfinite(float(np.asarray(x)))
    except (TypeError, ValueError):
        return True


class NonFiniteWatch:
    """Counts RL steps in a row whose update was skipped (`train/nonfinite_skipped` > 0) or whose
    loss / grad norm is non-finite; `check` raises TrainingStopped after `limit` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def check(self, step: int, metrics: dict) -> None:
        bad = float(np.asarray(metrics.get("train/nonfinite_skipped", 0) or 0)) > 0 or not all(
            _finite(metrics[k]) for k in ("train/loss", "train/grad_norm") if k in metrics
        )
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if bad:
            log.warning(
                "step %d: non-finite loss or gradient norm (%d step(s) in a row)",
                step,
                self.in_a_row,
            )
        if self.limit and self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"stopped at step {step}: {self.in_a_row} RL step(s) in a row with a non-finite "
                f"loss or gradient norm (trainer.max_nonfinite_steps={self.limit}); the last "
                "finite checkpoint is kept. Lower optim.learning_rate or check "
                "rollout.temperature"
            )


class CollapseWatch:
    """Warns (once per kind) when the policy collapses: mean token entropy within 5% of its
    maximum log(vocab), or accuracy 0 for `window` steps in a row without dynamic sampling."""

    def __init__(self, vocab_size: int, window: int, dynamic_sampling: bool):
        self.max_entropy = math.log(max(vocab_size, 2))
        self.window = window
        self.dynamic_sampling = dynamic_sampling
        self.zero_acc = 0
        self.warned: set[str] = set()

    def check(self, step: int, metrics: dict) -> list[str]:
        said = []
        ent = metrics.get("train/entropy")
        if ent is not None and _finite(ent) and float(ent) >= 0.95 * self.max_entropy:
            said.append(
                f"step {step}: train/entropy {float(ent):.3f} is at its maximum "
                f"log(vocab)={self.max_entropy:.3f}: the policy samples uniformly (collapsed)"
            )
        acc = metrics.get("train/accuracy")
        if acc is not None and not self.dynamic_sampling and self.window:
            self.zero_acc = self.zero_acc + 1 if float(acc) == 0.0 else 0
            if self.zero_acc >= self.window:
                said.append(
                    f"step {step}: train/accuracy has been 0 for {self.zero_acc} steps in a row "
                    "(collapsed policy?)"
                )
        for line in said:
            kind = line.split(" ")[2]
            if kind not in self.warned:
                log.warning("%s", line)
                self.warned.add(kind)
        return said


# ---------------------------------------------------------------- the trainer's calls
def setup_logging(level: int = logging.INFO) -> None:
    """Show htpo_jax's INFO lines ("resumed from step N", ...). Importing orbax installs absl's
    handler on the root logger, which turns `logging.basicConfig` into a no-op and leaves the
    root at WARNING, so INFO records of ours were never created. Setting the package logger's
    level is enough: its records propagate to whatever handler the root has."""
    logging.getLogger("htpo_jax").setLevel(level)
    absl = logging.getLogger("absl")
    if _drop_traceback not in absl.filters:
        absl.addFilter(_drop_traceback)


def _drop_traceback(record: logging.LogRecord) -> bool:
    """Orbax logs a failed background save with its traceback on every thread involved (~1,500
    lines for a full disk); the trainer reports it in one line, so absl's records keep only their
    message line."""
    if record.exc_info or record.exc_text:
        record.exc_info, record.exc_text = None, None
    return True


def prelaunch(cfg) -> None:
    """Checks that need no model load: model and tokenizer directories (data files are read
    right after, still before the model loads)."""
    check_model_dir(cfg.model.path, "model.path")
    tok = cfg.model.tokenizer_path or cfg.model.path
    check_model_dir(
        tok, "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path", tokenizer=True
    )
    for f in (*cfg.data.train_files, *cfg.data.val_files):
        if not is_url(f) and not Path(f).is_file():
            key = "data.train_files" if f in cfg.data.train_files else "data.val_files"
            raise LaunchError(f"{key}: data file not found: {f}")


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


class StepWatch:
    """The per-step checks of the training loop, after metrics are logged and before a save."""

    def __init__(self, cfg, vocab_size: int):
        t = cfg.trainer
        self.nonfinite = NonFiniteWatch(t.max_nonfinite_steps)
        self.collapse = CollapseWatch(vocab_size, t.collapse_window, cfg.algorithm.dynamic_sampling)
        self.last_saved: int | None = None

    def after_step(self, step: int, metrics: dict, ckpt) -> None:
        ckpt.check()  # a failed background save surfaces now, not at the next save
        self.collapse.check(step, metrics)
        try:
            self.nonfinite.check(step, metrics)
        except TrainingStopped:
            ckpt.close()  # let a good save in flight finish
            raise

    def save(self, step: int, state, extra: dict, ckpt) -> None:
        """Save only finite parameters; non-finite ones stop the run (nothing to continue from)."""
        if not all_finite(state.params):
            ckpt.close()
            kept = ckpt.all_steps()
            raise TrainingStopped(
                f"stopped at step {step}: the parameters are non-finite (NaN/inf), so checkpoint "
                f"{step} was not written; finite checkpoints kept: {kept or 'none'}. Lower "
                "optim.learning_rate or check rollout.temperature"
            )
        ckpt.save(step, state, extra)
        self.last_saved = step
