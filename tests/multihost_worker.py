"""One trainer process of a simulated multi-host run (test_multihost.py starts several).

`python tests/multihost_worker.py [train args...]` runs `htpo_jax.train.main` with test hooks set
by environment variables:

- MH_TRACE: a file; every step start, filter decision and reward time-out count of this process
  is appended as a JSON line (the test sees where each process is and compares the hosts).
- MH_SLOW_PROCESS=i: on process i only, the reward function sleeps MH_SLOW_S seconds for every
  4th response, so with a small `algorithm.reward_timeout_s` those responses time out there and
  nowhere else.
- MH_WATCHDOG=1 (with MH_DONE_DIR, a scratch dir): instead of training, a 2-process check of the
  host sync points: a matching barrier passes, then the processes wait at different stages and
  must stop with CollectiveTimeout naming the stage (printed as `WATCHDOG <message>`); exits 0
  when they did.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _trace(record: dict) -> None:
    path = os.environ.get("MH_TRACE")
    if path:
        import jax

        with open(path, "a") as f:
            f.write(json.dumps({"process": jax.process_index(), **record}) + "\n")


def _install_hooks() -> None:
    import jax

    import htpo_jax.run.stages as S
    import htpo_jax.run.train as T
    from htpo_jax.rewards import scoring

    rl_step, collect = T.rl_step, S.collect

    def traced_step(c, state, step):
        _trace({"event": "step", "step": step})
        return rl_step(c, state, step)

    def traced_collect(p, s, cfg, params, key, version=0):
        kept, stats = collect(p, s, cfg, params, key, version)
        _trace(
            {
                "event": "collect",
                "rounds": int(stats["filter/gen_batches"]),
                "accuracy": float(stats["train/accuracy"]),
                "acc_rows": np.asarray(kept.acc).astype(int).tolist(),
                "reward": np.round(np.asarray(kept.reward), 6).tolist(),
            }
        )
        return kept, stats

    T.rl_step, S.collect = traced_step, traced_collect

    import htpo_jax.rl.sample as E

    score = E.score_lockstep

    def traced_score(*args, **kw):
        reward, scored = score(*args, **kw)
        _trace({"event": "reward", "timed_out": int(scored.timed_out.sum())})
        return reward, scored

    E.score_lockstep = traced_score

    slow = os.environ.get("MH_SLOW_PROCESS")
    if slow is not None:
        base = scoring.REWARD_FNS["dapo_math"]
        delay = float(os.environ.get("MH_SLOW_S", "2"))
        calls = {"n": 0}

        def slow_fn(solution, ground_truth):
            calls["n"] += 1
            if jax.process_index() == int(slow) and calls["n"] % 4 == 0:
                time.sleep(delay)
            return base(solution, ground_truth)

        scoring.REWARD_FNS["dapo_math"] = slow_fn


def _leave_together(me: int) -> None:
    """Exit 0 once every process has printed its WATCHDOG line.

    Process 0 hosts the coordination service: if it left first, a host still inside its own
    (later-started) barrier would be killed by the service's fatal-error poller before its
    time-out fired. So each process leaves a file, and process 0 waits for all of them.
    """
    done = os.environ["MH_DONE_DIR"]
    open(os.path.join(done, f"done{me}"), "w").close()
    deadline = time.monotonic() + 120
    while me == 0 and time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(done, f"done{i}")) for i in range(2)):
            break
        time.sleep(0.1)
    os._exit(0)


def _watchdog_check(argv) -> None:
    from htpo_jax.infra import distributed as dist
    from htpo_jax.run.config import load_config

    cfg = load_config(None, argv)
    dist.initialize(cfg.distributed)
    import jax

    sync = dist.HostSync("watchdog", cfg.trainer.collective_timeout_s)
    me = jax.process_index()
    sync.barrier("both here")
    got = sync.allgather_bytes("gather", f"p{me}".encode())
    assert got == [b"p0", b"p1"], got
    try:
        sync.agree("decision", me)  # different values: must fail at once, on both
    except dist.CollectiveTimeout as e:
        print(f"AGREE {e}", flush=True)
    else:
        raise AssertionError("agree() passed on different values")
    t0 = time.monotonic()
    try:
        sync.barrier(f"stage only process {me} reaches")
    except dist.CollectiveTimeout as e:
        print(f"WATCHDOG {time.monotonic() - t0:.1f}s {e}", flush=True)
        _leave_together(me)
    raise AssertionError("barrier at different stages passed")


def main() -> None:
    argv = sys.argv[1:]
    if os.environ.get("MH_WATCHDOG") == "1":
        _watchdog_check(argv)
        return
    _install_hooks()
    from htpo_jax.run.train import main as train_main

    train_main(argv)


if __name__ == "__main__":
    main()
