"""The per-step watch of a run: `NonFiniteWatch` stops after `trainer.max_nonfinite_steps` RL
steps in a row with a non-finite (skipped) update; `CollapseWatch` warns, naming the metric, when
the policy collapses; `all_finite` keeps a checkpoint or an export from holding non-finite
parameters; `StepWatch` is what the loop calls after each step and for each save."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself (diverged); the message is one line that says why."""


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
        """Counts `step` as bad or resets the count; raises TrainingStopped once `limit` bad steps
        come in a row."""
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
        """The collapse warnings for `step` (each kind is logged once per run)."""
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


class StepWatch:
    """The per-step checks of the training loop, after metrics are logged and before a save."""

    def __init__(self, cfg, vocab_size: int):
        t = cfg.trainer
        self.nonfinite = NonFiniteWatch(t.max_nonfinite_steps)
        self.collapse = CollapseWatch(vocab_size, t.collapse_window, cfg.algorithm.dynamic_sampling)
        self.last_saved: int | None = None

    def after_step(self, step: int, metrics: dict, ckpt) -> None:
        """After a logged step: surfaces a failed background save, then runs the collapse and
        non-finite checks (on TrainingStopped, closes `ckpt` first)."""
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
