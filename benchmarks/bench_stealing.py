"""Work stealing between the engine's batch shards: the schedule of a paper-sized round, simulated.

    python benchmarks/bench_stealing.py                  # 256 prompts x 16, 32 shards (v5p-64)
    python benchmarks/bench_stealing.py --shards 8 --prompts 64 --max-new 4096

Runs the engine's real host side (`rollout.scheduler.Scheduler`, one per shard, and
`steal_work`) with a fake decode in place of the model: every response has a length drawn in
advance, and a round's sampled tokens end each row at its length. Nothing runs on a device, so
the printed numbers are the schedule's, not seconds: the lockstep rounds (one decode call of
K = steps_per_call steps each, all shards together), and the decode work they cost,
sum over rounds of D x S x K slot-steps (every shard runs the common S-slot program, so a shard
with nothing left still occupies its devices for that call) against the useful tokens.

Lengths: responses to one prompt are alike (hard problems get long answers), so each prompt
draws a mean response length log-uniform in [--min-mean, --max-mean] and its n responses are
geometric around that mean, capped at --max-new. This is a model of DAPO's rollouts, not data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from htpo_jax.rollout.scheduler import Scheduler, steal_work


def draw_lengths(prompts: int, n: int, max_new: int, lo: float, hi: float, seed: int):
    rng = np.random.default_rng(seed)
    means = np.exp(rng.uniform(np.log(lo), np.log(hi), prompts))
    lengths = rng.geometric(1.0 / np.repeat(means, n))
    return np.minimum(lengths, max_new).astype(int)


def simulate(lengths, prompt_len: int, n: int, shards: int, seqs: int, k: int, ps: int,
             stealing: bool) -> dict:  # fmt: skip
    """One engine call's schedule. Returns rounds, slot-steps, useful tokens, rows moved."""
    prompts = [np.ones(prompt_len, np.int32)] * (len(lengths) // n)
    bounds = np.linspace(0, len(prompts), shards + 1).astype(int)
    worst = -(-(prompt_len + int(lengths.max())) // ps) + 1
    pages = seqs * worst + len(prompts) * (-(-prompt_len // ps)) + 1
    blocks = [range(lo * n, hi * n) for lo, hi in itertools.pairwise(bounds)]  # rows by shard
    scheds = [Scheduler(prompts, n, int(lengths.max()), page_size=ps, num_pages=pages,
                        max_num_seqs=seqs, steps_per_call=k,
                        rows=rows) for rows in blocks]  # fmt: skip
    rounds = slot_steps = moved = 0
    while not all(s.done for s in scheds):
        if stealing:
            moved += steal_work(scheds)
        for s in scheds:
            s.advance()
        need = tuple(int(x) for x in np.max([s.needs() for s in scheds], axis=0))
        for s in scheds:
            _, dec = s.pack(*need)
            tok = np.full((need[0], k), 2, np.int32)
            for j, r in enumerate(dec.rows):
                at = lengths[r.row] - 1 - r.step  # EOS (token 1) at the row's last response index
                if at < k:
                    tok[j, at] = 1
            s.commit(dec, tok, (1,), _SINK, _SINK, np.zeros(tok.shape, np.float32))
            s.end_round()
        rounds += 1
        slot_steps += shards * need[0] * k
    return dict(rounds=rounds, slot_steps=slot_steps, useful=int(lengths.sum()), moved=moved)


class _Sink:
    """Output array stand-in: the schedule needs the rows' ends, not their tokens."""

    def __setitem__(self, key, value):
        pass


_SINK = _Sink()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=16, help="per shard (paper: 512 / 32)")
    ap.add_argument("--max-new", type=int, default=20480)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--min-mean", type=float, default=500)
    ap.add_argument("--max-mean", type=float, default=8000)
    ap.add_argument("--steps-per-call", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    rows = []
    for seed in range(a.seeds):
        lengths = draw_lengths(a.prompts, a.n, a.max_new, a.min_mean, a.max_mean, seed)
        for stealing in (False, True):
            t0 = time.perf_counter()
            r = simulate(lengths, a.prompt_len, a.n, a.shards, a.max_num_seqs,
                         a.steps_per_call, a.page_size, stealing)  # fmt: skip
            r.update(seed=seed, stealing=stealing, host_s=round(time.perf_counter() - t0, 2),
                     utilization=r["useful"] / r["slot_steps"])  # fmt: skip
            rows.append(r)
            print(f"seed {seed} stealing {'on ' if stealing else 'off'}: {r['rounds']:5d} rounds, "
                  f"{r['slot_steps']:,} slot-steps for {r['useful']:,} tokens "
                  f"({r['utilization']:.1%} useful), {r['moved']} rows moved, "
                  f"host {r['host_s']} s", flush=True)  # fmt: skip
    off = [r for r in rows if not r["stealing"]]
    on = [r for r in rows if r["stealing"]]
    ratio = [a_["rounds"] / b["rounds"] for a_, b in zip(off, on, strict=True)]
    print(f"rounds without / with stealing: {', '.join(f'{x:.2f}x' for x in ratio)}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(args=vars(a), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
