"""Batch scoring with a per-item time limit, and the DAPO overlong penalty.

No response may stall a training step: each item gets `timeout_s` seconds, after which it scores
-1 (acc False) and is counted in `RewardBatch.timed_out`. Two ways to enforce the limit:

- inline (`num_workers=0`, the default): items run in this process under a SIGALRM interval
  timer. Works for Python code and regexes (both check signals), not for a single C call that
  never returns to the interpreter (e.g. a giant integer power inside sympy). Off the main thread,
  or where SIGALRM does not exist, items run without a limit and a warning says so once.
- workers (`num_workers>0`, or a `RewardPool`): items run in spawned processes; a worker that
  overruns is killed and replaced, so the limit holds for anything.

math-verify is never run inline under a limit: sympy evaluates `10^{10^{10^{10}}}` in one C call
that SIGALRM cannot interrupt (> 60 s measured). With a limit and `num_workers=0` it runs in one
worker process: the caller's (`RewardPools`, which a run owns and closes), or one started for
the call.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait

import numpy as np

from htpo_jax.rewards.dapo_math import dapo_math_score
from htpo_jax.rewards.mathverify import math_verify_score

log = logging.getLogger(__name__)

REWARD_FNS: dict[str, Callable[[str, str], dict]] = {
    "dapo_math": dapo_math_score,
    "math_verify": math_verify_score,
}

TIMEOUT_PRED = "[TIMEOUT]"
ERROR_PRED = "[ERROR]"

ScoreFn = str | Callable[[str, str], dict]


@dataclass(frozen=True)
class RewardBatch:
    """Scores of N responses, in input order."""

    score: np.ndarray  # [N] float32, +1.0 / -1.0
    acc: np.ndarray  # [N] bool, the verifier's verdict (HTPO's `correct`)
    pred: list[str]  # [N] extracted answers, for logging
    timed_out: np.ndarray  # [N] bool, scored -1 because the time limit was hit

    @property
    def n_timeouts(self) -> int:
        """Responses scored -1 because the time limit was hit."""
        return int(self.timed_out.sum())


def overlong_penalty(length, max_len: int, buffer: int, factor: float) -> np.ndarray:
    """DAPO soft overlong punishment, in tokens, added to the score.

    penalty = min(-(L - (L_max - L_buffer)) / L_buffer * factor, 0): zero up to
    L_max - L_buffer tokens, then linear down to -factor at L_max. Vectorized over `length`.
    """
    length = np.asarray(length, dtype=np.float64)
    expected = max_len - buffer
    return np.minimum(-(length - expected) / buffer * factor, 0.0)


def resolve_fn(fn: ScoreFn) -> Callable[[str, str], dict]:
    """A reward function from its config name (`dapo_math`, `math_verify`) or itself."""
    if callable(fn):
        return fn
    try:
        return REWARD_FNS[fn]
    except KeyError:
        raise ValueError(f"unknown reward fn {fn!r}; allowed: {sorted(REWARD_FNS)}") from None


def _safe_call(fn: Callable[[str, str], dict], solution: str, ground_truth: str) -> dict:
    try:
        out = fn(solution, ground_truth)
        return {"score": float(out["score"]), "acc": bool(out["acc"]), "pred": str(out["pred"])}
    except Exception:  # a verifier bug on one odd string must not end the run
        log.debug("reward fn raised", exc_info=True)
        return {"score": -1.0, "acc": False, "pred": ERROR_PRED}


_TIMED_OUT = {"score": -1.0, "acc": False, "pred": TIMEOUT_PRED}


def _collect(results: list[dict], timed_out: list[bool]) -> RewardBatch:
    return RewardBatch(
        score=np.array([r["score"] for r in results], dtype=np.float32),
        acc=np.array([r["acc"] for r in results], dtype=bool),
        pred=[r["pred"] for r in results],
        timed_out=np.array(timed_out, dtype=bool),
    )


class _ItemTimeout(BaseException):
    """Raised by the alarm handler. A BaseException so `except Exception` in verifiers (math-verify
    has several) cannot swallow it."""


@functools.cache
def _warn_no_alarm() -> None:  # once per process
    log.warning("reward time limit not enforced inline off the main thread; use num_workers>0")


def _score_inline(fn, solutions, ground_truths, timeout_s) -> RewardBatch:
    use_alarm = (
        timeout_s is not None
        and timeout_s > 0
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )
    if timeout_s and not use_alarm:
        _warn_no_alarm()

    results: list[dict] = []
    timed_out: list[bool] = []
    if not use_alarm:
        for s, g in zip(solutions, ground_truths, strict=True):
            results.append(_safe_call(fn, s, g))
            timed_out.append(False)
        return _collect(results, timed_out)

    def on_alarm(signum, frame):
        raise _ItemTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for s, g in zip(solutions, ground_truths, strict=True):
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    out = _safe_call(fn, s, g)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                results.append(out)
                timed_out.append(False)
            except _ItemTimeout:
                results.append(dict(_TIMED_OUT))
                timed_out.append(True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return _collect(results, timed_out)


def _worker_main(conn, fn) -> None:
    fn = resolve_fn(fn)
    # One call before "ready" pays the verifier's lazy imports (math-verify + sympy: seconds on
    # a loaded machine), which would otherwise count against the first item's limit.
    _safe_call(fn, "Answer: 0", "0")
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, solution, ground_truth = msg
        conn.send((idx, _safe_call(fn, solution, ground_truth)))


class RewardPool:
    """Persistent scoring processes with a hard per-item time limit.

    `fn` must be picklable (a config name or a module-level function): workers are spawned, not
    forked, because forking a process that runs JAX threads is unsafe. Use as a context manager,
    or call `close()`.
    """

    def __init__(
        self,
        fn: ScoreFn = "dapo_math",
        num_workers: int = 2,
        timeout_s: float | None = 10.0,
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        resolve_fn(fn)  # fail early on a bad name
        self.fn = fn
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context("spawn")
        self._workers: list[tuple[mp.process.BaseProcess, object] | None] = [None] * num_workers

    def _spawn(self, slot: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.fn), daemon=True)
        proc.start()
        child.close()
        self._workers[slot] = (proc, parent)

    def _await_ready(self, slot: int) -> None:
        # Start-up (spawn + imports) can take seconds; it must not count against an item's limit.
        conn = self._workers[slot][1]
        if not conn.poll(self.startup_timeout_s) or conn.recv() != "ready":
            self._kill(slot)
            raise RuntimeError(f"reward worker did not start within {self.startup_timeout_s}s")

    def _ensure_started(self, slots) -> None:
        fresh = [s for s in slots if self._workers[s] is None]
        for s in fresh:
            self._spawn(s)
        for s in fresh:
            self._await_ready(s)

    def _kill(self, slot: int) -> None:
        entry = self._workers[slot]
        if entry is None:
            return
        proc, conn = entry
        proc.kill()
        proc.join()
        conn.close()
        self._workers[slot] = None

    def score(self, solutions: Sequence[str], ground_truths: Sequence[str]) -> RewardBatch:
        """Scores the responses against their ground truths on the workers, in input order; an item
        past `timeout_s` (its worker is killed and replaced) or whose worker died scores -1."""
        if len(solutions) != len(ground_truths):
            raise ValueError(f"{len(solutions)} solutions but {len(ground_truths)} ground truths")
        n = len(solutions)
        results: list[dict | None] = [None] * n
        timed_out = [False] * n
        todo = list(range(n - 1, -1, -1))  # a stack; pop() gives items in order
        busy: dict[int, tuple[int, float]] = {}  # slot -> (item, deadline)

        limit = self.timeout_s if self.timeout_s is not None else float("inf")

        def dispatch(slot: int) -> None:
            self._ensure_started([slot])
            i = todo.pop()
            self._workers[slot][1].send((i, solutions[i], ground_truths[i]))
            busy[slot] = (i, time.monotonic() + limit)

        self._ensure_started(range(min(n, len(self._workers))))
        for slot in range(len(self._workers)):
            if todo:
                dispatch(slot)
        while busy:
            conn_slot = {self._workers[s][1]: s for s in busy}
            first_deadline = min(d for _, d in busy.values())
            wait_s = None if first_deadline == float("inf") else first_deadline - time.monotonic()
            ready = wait(list(conn_slot), timeout=None if wait_s is None else max(0.0, wait_s))
            for conn in ready:
                slot = conn_slot[conn]
                try:
                    i, out = conn.recv()
                except (EOFError, OSError):  # the worker died: count the item as failed
                    i = busy[slot][0]
                    out = {"score": -1.0, "acc": False, "pred": ERROR_PRED}
                    self._kill(slot)
                results[i] = out
                del busy[slot]
                if todo:
                    dispatch(slot)
            now = time.monotonic()
            for slot, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    self._kill(slot)
                    results[i] = dict(_TIMED_OUT)
                    timed_out[i] = True
                    del busy[slot]
                    if todo:
                        dispatch(slot)
        return _collect(results, timed_out)

    def close(self) -> None:
        """Stops every worker (asked to exit, killed after 1 s) and closes its pipe."""
        for slot, entry in enumerate(self._workers):
            if entry is None:
                continue
            proc, conn = entry
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
            self._workers[slot] = None

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class RewardPools:
    """The worker pools of one owner (a run, an evaluation): one `RewardPool` per (verifier,
    limit, workers), started on first use and closed with the owner (`close`, or `with`).
    Every verifier a run routes to gets its own pool; nothing outlives the owner."""

    def __init__(self):
        self._pools: dict[tuple[str, float | None, int], RewardPool] = {}

    def get(self, fn: str, timeout_s: float | None, num_workers: int = 1) -> RewardPool:
        """The pool of verifier `fn` (a config name) under `timeout_s`, started when new."""
        key = (fn, timeout_s or None, int(num_workers))
        if key not in self._pools:
            self._pools[key] = RewardPool(fn, num_workers=num_workers, timeout_s=timeout_s)
        return self._pools[key]

    def close(self) -> None:
        """Stops every pool's workers."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def __enter__(self) -> RewardPools:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_batch(
    solutions: Sequence[str],
    ground_truths: Sequence[str],
    fn: ScoreFn = "dapo_math",
    timeout_s: float | None = 10.0,
    num_workers: int = 0,
    pools: RewardPools | None = None,
) -> RewardBatch:
    """Score N decoded responses against their ground truths (`fn`: config name or callable).

    `timeout_s` bounds each item (None or 0: no limit). Worker processes score when
    `num_workers>0`, and for math-verify under a limit (one worker): from `pools` (kept by the
    caller, e.g. the run) when given, else started for this call only.
    """
    if len(solutions) != len(ground_truths):
        raise ValueError(f"{len(solutions)} solutions but {len(ground_truths)} ground truths")
    if num_workers <= 0 and timeout_s and resolve_fn(fn) is math_verify_score:
        fn, num_workers = "math_verify", 1
    if num_workers > 0:
        if pools is not None and isinstance(fn, str):
            return pools.get(fn, timeout_s, num_workers).score(solutions, ground_truths)
        with RewardPool(fn, num_workers=num_workers, timeout_s=timeout_s) as pool:
            return pool.score(solutions, ground_truths)
    return _score_inline(resolve_fn(fn), solutions, ground_truths, timeout_s)


def compute_rewards(
    solutions: Sequence[str],
    ground_truths: Sequence[str],
    response_lengths,
    cfg,
    pools: RewardPools | None = None,
    fn: str | None = None,
) -> tuple[np.ndarray, RewardBatch]:
    """The DAPO reward of a Config: verifier score plus, if enabled, the overlong penalty;
    worker processes (`algorithm.reward_num_workers`, math-verify under a limit) from `pools`;
    `fn` (a verifier name) overrides `algorithm.reward_fn`.

    `response_lengths` [N] counts each response's valid tokens (EOS included), as verl's DAPO
    reward manager does. `cfg` is the whole Config (algorithm.* and rollout.max_response_length).
    Returns (reward [N] float32, the verifier's RewardBatch); `acc` is untouched by the penalty.
    """
    a = cfg.algorithm
    scored = score_batch(
        solutions,
        ground_truths,
        fn=fn or a.reward_fn,
        timeout_s=a.reward_timeout_s,
        num_workers=a.reward_num_workers,
        pools=pools,
    )
    reward = scored.score.astype(np.float32)
    if a.overlong_buffer_enable:
        reward = reward + overlong_penalty(
            response_lengths,
            cfg.rollout.max_response_length,
            a.overlong_buffer_len,
            a.overlong_penalty_factor,
        ).astype(np.float32)
    return reward, scored
