"""`python -m htpo_jax.step_time --config FILE --topology v5p-64`: seconds per RL step, by stage.

A step model, not a measurement. It runs the engine's real host scheduler (`rollout.scheduler`,
one per batch shard, with `steal_work` when `rollout.work_stealing` is on) over a response-length
distribution with a fake decode (each row ends at its drawn length), and costs every lockstep
round at that round's shape: K = steps_per_call steps, each reading the shard's weights plus the
KV of its live rows (`kv_len` from the packed plan) at the chip's HBM bandwidth, or its matmul
FLOPs at peak if that is longer; the slowest shard sets the round. It adds prefill, the
old-log-prob (and reference) pass and the update over the token-budget micro-batches those
lengths give (`rl.packing.plan`, padded to the compiled prompt width, remat recompute
included), FSDP all-gathers / reduce-scatters at ICI bandwidth (overlapped: a micro-batch takes
the longer of compute and collective), the AdamW step as HBM traffic, and `--gen-rounds`
generation rounds (dynamic sampling).

Floors are what the chips allow for the useful work: decode, every useful token packed into
full-width steps (weights once per step) plus its own KV reads; scoring and update, 2 / 6 x
matmul parameters x real (unpadded) tokens plus causal attention at peak. The ratio estimate /
floor is the waste the schedule and the padding add. Not covered: host time, the Python
scheduler itself, input pipeline, reward scoring, compiler inefficiency (`compile_check --time`
reports the compiler's own figures per program), preemption.

`--compiled REPORT` (a `compile_check --time --json` report of the same run and target): the
scoring, update and optimizer stages are costed at the compiler's figures instead, as the
compiler's seconds for the compiled call over this model's roofline of that call (the factor
is printed per stage in the 'cost from' column). The engine's prefill and decode stay on the
roofline: XLA counts their in-place KV pool as traffic (see ENGINE_STAGES).

`--async-modes` (issue 22's asynchronous RL; `async_modes`): a second table of seconds per step
for sync (the estimate above), `one_step` and `stream` with `separate` placement at every
rollout / trainer split (every host gives 1 .. chips per host - 1 of its chips to the rollout):
one_step drains its rollout on R chips (the same scheduler over R's batch shards) while T train,
stream runs the scheduler over several steps' prompts back to back and takes its steady-state
decode per step plus the re-prefill of the rows carried over a step boundary; both add the
weight sync (each rollout chip receives the model over its ICI). Colocated one_step overlaps
only host work, which this model does not cost: it is sync here.

Lengths: `synthetic` (default) draws bench_stealing.py's DAPO-like model (per prompt a mean
log-uniform in [max/41, max/2.56] -- 500 .. 8,000 at the paper's 20,480 -- and n geometric
lengths around it, capped); or a file of integers (one per line, or a JSON list).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from htpo_jax.infra.topology import TargetError, resolve_target
from htpo_jax.rl import packing
from htpo_jax.rollout.scheduler import Scheduler, steal_work
from htpo_jax.run.config import Config, add_config_args, config_from_args
from htpo_jax.tools.compile_programs import MODELS_DIR, model_config_path, prompt_width

DEFAULT_CONFIG = MODELS_DIR.parent / "default.yaml"
STAGES = ("prefill", "decode", "old_log_prob", "ref_log_prob", "update", "optimizer")


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model numbers the cost needs (from its config.json)."""

    layers: int
    matmul_params: int  # every matmul weight, the LM head included (the embedding lookup is not)
    params: int  # all parameters (the optimizer's state)
    q_dim: int  # num_heads x head_dim
    kv_token_bytes: int  # K and V of one token over all layers, compute dtype

    @classmethod
    def of(cls, m, itemsize: int) -> Shape:
        """The Shape of model config `m`, its K and V stored at `itemsize` bytes per value."""
        d, q, kv = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        layer = d * q + 2 * d * kv + q * d + 3 * d * m.intermediate_size
        head = m.vocab_size * d
        total = m.num_layers * layer + head * (1 if m.tie_word_embeddings else 2)
        kvb = 2 * m.num_layers * kv * itemsize
        return cls(m.num_layers, m.num_layers * layer + head, total, q, kvb)

    def forward_flops(self, rows: int, tokens: int) -> float:
        """Matmuls + causal attention (QK and PV, half the square) of `rows` rows of `tokens`."""
        return 2.0 * self.matmul_params * rows * tokens + 2.0 * rows * tokens**2 * self.q_dim * (
            self.layers
        )


def draw_lengths(prompts: int, n: int, max_new: int, seed: int) -> np.ndarray:
    """bench_stealing.py's DAPO-like lengths, its 500 .. 8,000 means scaled to `max_new`."""
    rng = np.random.default_rng(seed)
    lo, hi = max_new * 500 / 20480, max_new * 8000 / 20480
    means = np.maximum(np.exp(rng.uniform(np.log(lo), np.log(hi), prompts)), 1.0)
    return np.minimum(rng.geometric(1.0 / np.repeat(means, n)), max_new).astype(int)


def read_lengths(path: str, max_new: int) -> np.ndarray:
    """Response lengths from a file (a JSON list or whitespace-separated integers), capped at
    `max_new`; ValueError unless all are positive."""
    text = Path(path).read_text()
    vals = json.loads(text) if text.lstrip().startswith("[") else text.split()
    out = np.minimum(np.asarray([int(v) for v in vals]), max_new)
    if out.size == 0 or out.min() < 1:
        raise ValueError(f"--lengths {path}: expected positive integers")
    return out


class _Sink:
    def __setitem__(self, key, value):
        pass


def _rounds(lengths, prompt_len: int, n: int, shards: int, seqs: int, k: int, ps: int,
            stealing: bool):  # fmt: skip
    """The engine's schedule of one generate call, a round at a time: yields (rows S of the
    common program, live KV tokens of each shard, the live rows' KV lengths per shard, response
    tokens the round decodes)."""
    prompts = [np.ones(prompt_len, np.int32)] * (len(lengths) // n)
    bounds = np.linspace(0, len(prompts), shards + 1).astype(int)
    worst = -(-(prompt_len + int(lengths.max())) // ps) + 1
    pages = seqs * worst + len(prompts) * (-(-prompt_len // ps)) + 1
    scheds = [Scheduler(prompts, n, int(lengths.max()), page_size=ps, num_pages=pages,
                        max_num_seqs=seqs, steps_per_call=k, rows=range(lo * n, hi * n))
              for lo, hi in itertools.pairwise(bounds)]  # fmt: skip
    while not all(s.done for s in scheds):
        if stealing:
            steal_work(scheds)
        for s in scheds:
            s.advance()
        need = tuple(int(x) for x in np.max([s.needs() for s in scheds], axis=0))
        live, kvs, tokens = [], [], 0
        for s in scheds:
            _, dec = s.pack(*need)
            kvs.append(dec.kv_len_s[dec.active_s])
            live.append(int(kvs[-1].sum()))
            tok = np.full((need[0], k), 2, np.int32)
            for j, r in enumerate(dec.rows):
                at = lengths[r.row] - 1 - r.step  # EOS at the row's last response index
                if at < k:
                    tok[j, at] = 1
                tokens += min(at + 1, k)
            s.commit(dec, tok, (1,), _Sink(), _Sink(), np.zeros(tok.shape, np.float32))
            s.end_round()
        yield need[0], live, kvs, tokens


def schedule(lengths, prompt_len: int, n: int, shards: int, seqs: int, k: int, ps: int,
             stealing: bool) -> list[tuple[int, list[int]]]:  # fmt: skip
    """The engine's schedule of one generate call: per lockstep round, (rows S of the common
    program, live KV tokens of each shard)."""
    return [(s_rows, live) for s_rows, live, _, _ in
            _rounds(lengths, prompt_len, n, shards, seqs, k, ps, stealing)]  # fmt: skip


def micro_cost(shape: Shape, micros, p: int, chips: int, peak: float, ici_s: float,
               passes: float, factor: float = 1.0) -> float:  # fmt: skip
    """Seconds of a pass over token-budget micro-batches: each the longer of its FLOPs (x
    `passes` forwards) at peak over all chips (x the compiler's `factor`) and its collectives
    (`ici_s`)."""
    t = 0.0
    for m in micros:
        flops = passes * shape.forward_flops(len(m.rows), p + m.width)
        t += max(factor * flops / (chips * peak), ici_s)
    return t


# The engine's programs write their KV pages in place into a pool the size of the free HBM, and
# XLA's cost model counts that pool as traffic (Qwen3-4B on v5p-8: 430 GB per decode step for
# 8 GB of weights): their figures would cost the pool, not the work, so they are shown, not used.
ENGINE_STAGES = ("prefill", "decode")


def compiler_factors(report: dict, cfg: Config, target, shape: Shape) -> dict:
    """{stage: (factor, label)} from a `compile_check --time` report of the same run: for each
    compiled program, the compiler's seconds for one call (XLA's optimal_seconds scaled by its
    loop trips, the Pallas kernels' FLOPs/bytes added from shapes) over what this model's
    roofline gives the same call (decode: one step outside the paged-attention kernel). The
    engine's figures are labelled but not used (factor None: see ENGINE_STAGES)."""
    pk, chips, tensor = target.peaks, target.chips, max(cfg.mesh.tensor, 1)
    if report.get("target") != target.name or report.get("num_layers") != shape.layers:
        raise ValueError(f"--compiled: report is for {report.get('target')} with "
                         f"{report.get('num_layers')} layers, not {target.name} with "
                         f"{shape.layers}")  # fmt: skip
    itemsize = 4 if cfg.model.dtype in ("float32", "fp32") else 2
    w_s = shape.matmul_params * itemsize / tensor / pk.hbm_bytes_per_s
    passes = 4.0 if cfg.model.remat else 3.0
    stages = {"engine_prefill": "prefill", "engine_decode": "decode", "optimizer": "optimizer",
              "old_log_prob": "old_log_prob", "update": "update"}  # fmt: skip
    best: dict = {}
    for row in report["programs"]:
        t, stage = row.get("time"), stages.get(row["program"])
        if not t or stage is None or ("rows" not in t and stage != "optimizer"):
            continue
        if stage == "decode":
            work, secs = t["rows"], t["compiler_seconds"] / t["trips"]
            flops = 2.0 * shape.matmul_params * t["rows"] / tensor
            roof = max(w_s, flops / pk.bf16_flops)
            if not row.get("pallas_calls"):  # XLA attention: the compiler counted the KV reads
                kv = t["rows"] * t["pages"] * cfg.rollout.page_size * shape.kv_token_bytes
                roof = max(w_s + kv / tensor / pk.hbm_bytes_per_s, flops / pk.bf16_flops)
        elif stage == "optimizer":
            work, secs = 1, t["seconds"]
            roof = 7 * 4 * shape.params / chips / pk.hbm_bytes_per_s
        else:
            work, secs = t["rows"] * t["tokens"], t["seconds"]
            fwd = shape.forward_flops(t["rows"], t["tokens"]) / pk.bf16_flops
            roof = fwd / tensor if stage == "prefill" else fwd / chips  # engine: per chip
            roof *= passes if stage == "update" else 1.0
        if stage not in best or work > best[stage][0]:  # the call with the most work
            label = f"compiler x{secs / roof:.2f} ({row['program']} {row['shape']})"
            factor = secs / roof
            if stage in ENGINE_STAGES:
                factor, label = None, f"roofline ({label}: not used, it counts the KV pool)"
            elif factor < 1.0:  # below the shapes' own FLOPs: a loop it counted once, unscaled
                factor, label = None, f"roofline ({label}: not used, under the shapes' FLOPs)"
            best[stage] = (work, factor, label)
    out = {s: (f, label) for s, (_, f, label) in best.items()}
    if "old_log_prob" in out:
        out.setdefault("ref_log_prob", out["old_log_prob"])
    return out


def train_costs(c: Config, target, shape: Shape, kept: np.ndarray, prompt_len: int,
                f: dict) -> dict:  # fmt: skip
    """Seconds and floors of the training stages over the kept responses' lengths (`kept`, the
    real prompts `prompt_len` tokens, padded to the compiled prompt width); `f`: the compiler
    factors per stage (1.0 = roofline)."""
    pk, chips, r = target.peaks, target.chips, c.rollout
    itemsize = 4 if c.model.dtype in ("float32", "fp32") else 2
    shards = batch_shards(c, chips)
    p = prompt_width(c)
    budget = c.optim.max_tokens_per_micro

    def micros(ext):
        if budget:
            mult = c.data.pad_to_multiple
            cap = r.max_response_length
            return packing.plan(ext, p, max_tokens=budget, shards=shards, multiple=mult, cap=cap)
        return packing.fixed(len(ext), c.optim.micro_batch_size, r.max_response_length)

    gather_s = shape.params * itemsize / pk.ici_bytes_per_s  # FSDP: every chip gathers all
    score = micro_cost(shape, micros(kept), p, chips, pk.bf16_flops, gather_s, 1.0,
                       f["old_log_prob"])  # fmt: skip
    ref = score if c.algorithm.use_kl_loss else 0.0
    passes = 4.0 if c.model.remat else 3.0  # forward, (recompute), backward = 2 forwards
    mini_rows = c.optim.mini_batch_size * r.n
    updates = c.optim.ppo_epochs * -(-len(kept) // mini_rows)
    update = 0.0
    for i in range(0, len(kept), mini_rows):
        ms = micros(kept[i : i + mini_rows])
        # all-gather forward (+ again for the remat/backward) and reduce-scatter the gradient
        update += micro_cost(shape, ms, p, chips, pk.bf16_flops, 3 * gather_s, passes,
                             f["update"])  # fmt: skip
    update *= c.optim.ppo_epochs
    # AdamW: f32 params, two moments (read + write) and the f32 gradient (read), FSDP-sharded.
    opt_floor = updates * 7 * 4 * shape.params / chips / pk.hbm_bytes_per_s
    tokens = float(np.sum(prompt_len + kept))
    real = sum(shape.forward_flops(1, prompt_len + int(x)) for x in kept)
    train_floor = real / (chips * pk.bf16_flops)
    computed = sum(len(m.rows) * (p + m.width) for m in micros(kept))
    return {
        "seconds": {
            "old_log_prob": score,
            "ref_log_prob": ref,
            "update": update,
            "optimizer": f["optimizer"] * opt_floor,
        },  # fmt: skip
        "floor_seconds": {
            "old_log_prob": train_floor,
            "ref_log_prob": train_floor if ref else 0.0,
            "update": 3 * train_floor * c.optim.ppo_epochs,
            "optimizer": opt_floor,
        },  # fmt: skip
        "tokens": tokens,
        "busy": tokens / computed,
        "update_mfu": 6.0
        * shape.matmul_params
        * tokens
        * c.optim.ppo_epochs
        / (update * chips * pk.bf16_flops),
        "flops_per_token": real / tokens * 3,  # forward + backward, attention included
    }


def batch_shards(c: Config, chips: int) -> int:
    """Batch shards of the run's mesh on `chips` chips: data x fsdp, or chips // tensor when
    mesh.fsdp is -1."""
    tensor, data = max(c.mesh.tensor, 1), max(c.mesh.data, 1)
    return max(chips // tensor, 1) if c.mesh.fsdp == -1 else data * c.mesh.fsdp


def compute_itemsize(c: Config) -> int:
    """Bytes per value of the compute dtype (the engine's weights and KV)."""
    return 4 if c.model.dtype in ("float32", "fp32") else 2


def round_cost(shape: Shape, itemsize: int, tensor: int, pk, k: int):
    """The seconds of one lockstep decode round as a function of (rows S, the most live KV tokens
    of a shard): K steps, each reading the shard's weights (replicated over the batch shards,
    split by tensor) plus the KV of its live rows at HBM bandwidth, or its matmul FLOPs at peak
    if that is longer."""
    w = (shape.matmul_params * itemsize) / tensor
    kvb = shape.kv_token_bytes / tensor
    step_flops = lambda s: 2.0 * shape.matmul_params * s / tensor

    def cost(s_rows: int, live_max: int) -> float:
        kv = live_max + s_rows * k / 2  # the K steps grow each row
        mem = (w + kv * kvb) / pk.hbm_bytes_per_s
        return k * max(mem, step_flops(s_rows) / pk.bf16_flops)

    return cost


def rollout_costs(c: Config, pk, shape: Shape, lengths: np.ndarray, prompt_len: int, chips: int,
                  seqs: int | None = None) -> dict:  # fmt: skip
    """One generation round of `lengths` on `chips` chips (the run's mesh over them): the
    scheduled decode's seconds and rounds, its floor, and the prefill (at its floor). `seqs`:
    decode slots per batch shard (default: `rollout.max_num_seqs` over the shards)."""
    r = c.rollout
    itemsize = compute_itemsize(c)
    tensor = max(c.mesh.tensor, 1)
    shards = batch_shards(c, chips)
    if seqs is None:
        seqs = -(-(r.max_num_seqs or 512) // shards)
    k, ps = r.steps_per_call, r.page_size
    rounds = schedule(lengths, prompt_len, r.n, shards, seqs, k, ps, r.work_stealing)
    cost = round_cost(shape, itemsize, tensor, pk, k)
    decode = 0.0
    for s_rows, live in rounds:
        decode += cost(s_rows, max(live))
    w = (shape.matmul_params * itemsize) / tensor
    kvb = shape.kv_token_bytes / tensor
    useful = int(lengths.sum())
    kv_reads = float(np.sum(prompt_len * lengths + lengths * (lengths + 1) / 2)) * kvb
    min_steps = useful / (shards * seqs)
    decode_floor = (min_steps * w + kv_reads / shards) / pk.hbm_bytes_per_s
    n_prompts = len(lengths) // r.n
    prefill_floor = shape.forward_flops(n_prompts, prompt_len) / (chips * pk.bf16_flops)
    return {
        "batch_shards": shards,
        "seqs": seqs,
        "rounds": len(rounds),
        "slot_steps": sum(s * k * shards for s, _ in rounds),
        "decode": decode,
        "decode_floor": decode_floor,
        "prefill": prefill_floor,
        "useful": useful,
    }


def estimate(cfg: Config, target, model_cfg, lengths: np.ndarray, *, prompt_len: int,
             gen_rounds: float, compiled: dict | None = None) -> dict:  # fmt: skip
    """The step model (see the module docstring); a dict of stages, floors and rates. With
    `compiled` (a `compile_check --time` report), each stage whose program it holds is costed
    at the compiler's figure (`compiler_factors`); the rest stay roofline arithmetic."""
    pk = target.peaks
    if pk is None:
        raise TargetError("step_time needs a TPU target (--topology): CPU devices have no peaks")
    c, r, chips = cfg, cfg.rollout, target.chips
    shape = Shape.of(model_cfg, compute_itemsize(c))
    cal = compiler_factors(compiled, c, target, shape) if compiled else {}
    f = {s: cal[s][0] if cal.get(s, (None,))[0] is not None else 1.0 for s in STAGES}
    ro = rollout_costs(c, pk, shape, lengths, prompt_len, chips)
    shards, rounds = ro["batch_shards"], ro["rounds"]
    decode, decode_floor, useful = ro["decode"], ro["decode_floor"], ro["useful"]
    prefill = prefill_floor = ro["prefill"]
    # Training: the kept groups (train_batch_size prompts), padded to the compiled prompt width.
    kept = lengths[: c.data.train_batch_size * r.n]
    tr = train_costs(c, target, shape, kept, prompt_len, f)
    stages = {"prefill": gen_rounds * prefill, "decode": gen_rounds * decode, **tr["seconds"]}
    floors = {"prefill": gen_rounds * prefill_floor, "decode": gen_rounds * decode_floor,
              **tr["floor_seconds"]}  # fmt: skip
    total = sum(stages.values())
    slot_steps = ro["slot_steps"]
    return {
        "target": target.name,
        "chips": chips,
        "batch_shards": shards,
        "responses": int(len(lengths)),
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "decode_rounds": rounds,
        "gen_rounds": gen_rounds,
        "seconds": stages,
        "floor_seconds": floors,
        "total_seconds": total,
        "share": {s: v / total for s, v in stages.items()},
        "busy": {
            "decode": useful / slot_steps,
            "update": tr["busy"],
        },
        "floor_ratio": {s: stages[s] / floors[s] for s in STAGES if floors[s] > 0},
        "source": {s: cal[s][1] if s in cal else "roofline" for s in STAGES},
        "decode_tokens_per_s_per_chip": useful / decode / chips,
        "update_mfu": tr["update_mfu"],
    }


def report(est: dict) -> str:
    """The estimate as text: a header line, a markdown table of seconds per stage against the
    floors, and the decode / update utilization."""
    lines = [
        f"target {est['target']} ({est['chips']} chips, {est['batch_shards']} batch shards): "
        f"{est['responses']} responses, mean {est['mean_length']:.0f} max {est['max_length']} "
        f"tokens, {est['decode_rounds']} decode rounds x {est['gen_rounds']} generation rounds",
        "| stage | seconds | share | floor s | est/floor | cost from |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in STAGES:
        sec, fl = est["seconds"][s], est["floor_seconds"][s]
        ratio = f"{sec / fl:.2f}" if fl else "-"
        lines.append(f"| {s} | {sec:.4g} | {est['share'][s]:.1%} | {fl:.4g} | {ratio} | "
                     f"{est['source'][s]} |")  # fmt: skip
    floor = sum(est["floor_seconds"].values())
    lines.append(f"| total | {est['total_seconds']:.4g} | 100% | {floor:.4g} | "
                 f"{est['total_seconds'] / floor:.2f} | |")  # fmt: skip
    lines.append(
        f"decode {est['decode_tokens_per_s_per_chip']:.0f} tokens/s/chip, busy "
        f"{est['busy']['decode']:.1%} of slot-steps; update MFU {est['update_mfu']:.1%}, "
        f"{est['busy']['update']:.1%} of computed tokens real"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- asynchronous RL (issue 22)
ASYNC_MODES = ("sync", "one_step", "stream")


def rollout_splits(c: Config, target) -> list[int]:
    """Rollout chip counts R of `separate` placement: every host gives d of its chips to the
    rollout (`rollout.devices_per_host`, 1 .. chips per host - 1) and the rest to the trainer, so
    R = hosts x d; kept where mesh.tensor divides both R and the trainer's T = chips - R. Hosts
    hold 4 chips (v5p, v4, and v5e / v6e slices over 8 chips); v5e / v6e slices of up to 8 chips
    are one host."""
    gen = target.name.partition("-")[0]
    per_host = target.chips if gen in ("v5e", "v6e") and target.chips <= 8 else 4
    per_host = min(per_host, target.chips)
    hosts, tensor = target.chips // per_host, max(c.mesh.tensor, 1)
    out = [hosts * d for d in range(1, per_host)]
    return [r for r in out if r % tensor == 0 and (target.chips - r) % tensor == 0]


def submesh(c: Config) -> Config:
    """The run's config on a sub-mesh of `separate` placement: mesh.tensor kept, every other
    chip a batch shard (data 1, fsdp -1)."""
    return dataclasses.replace(c, mesh=dataclasses.replace(c.mesh, data=1, fsdp=-1))


def weight_sync_seconds(shape: Shape, itemsize: int, tensor: int, pk) -> float:
    """The new weights to the rollout chips after an update: each rollout chip receives the
    engine's copy of the whole model (every parameter, the embedding included, in the compute
    dtype; replicated over the batch shards, split by tensor) over its own ICI links at
    `pk.ici_bytes_per_s`. What a chip receives is the bound: a broadcast that sends each trainer
    shard once into the rollout chips and all-gathers it there keeps every link under it."""
    return shape.params * itemsize / tensor / pk.ici_bytes_per_s


def stream_rollout(c: Config, pk, shape: Shape, lengths: np.ndarray, prompt_len: int,
                   chips: int, seqs: int, steps: int, seed: int) -> dict:  # fmt: skip
    """The steady state of `stream` (partial rollout) on `chips` rollout chips: `steps` steps'
    worth of prompts (`lengths`' groups, shuffled per step) go back to back through the engine's
    scheduler, each shard admitting new rows as rows finish, never draining between steps. Step
    j ends when the response tokens decoded reach j x a step's tokens (the time interpolated
    within the round that crosses it); the decode seconds per step are the mean over steps 2 ..
    steps - 1 (step 1 is the warm-up from empty slots, the last step's drain is never reached).
    At each such boundary the rows still live are carried into the next step and re-prefilled
    under the new weights (each row its prompt + the tokens it has, costed at peak FLOPs over the
    rollout chips; rows of one prompt re-prefill the prompt each, an upper bound)."""
    if steps < 3:
        raise ValueError(f"--stream-steps {steps}: needs at least 3 (warm-up, one step, end)")
    r = c.rollout
    rng = np.random.default_rng(seed)
    groups = lengths.reshape(-1, r.n)
    stream = np.concatenate([groups[rng.permutation(len(groups))] for _ in range(steps)])
    stream = stream.reshape(-1)
    per_step = int(lengths.sum())
    tensor = max(c.mesh.tensor, 1)
    shards = batch_shards(c, chips)
    k = r.steps_per_call
    cost = round_cost(shape, compute_itemsize(c), tensor, pk, k)
    t, done, marks = 0.0, 0, []  # (seconds, re-prefill FLOPs) at each step boundary
    rounds = _rounds(stream, prompt_len, r.n, shards, seqs, k, r.page_size, r.work_stealing)
    for s_rows, live, kvs, tokens in rounds:
        dt = cost(s_rows, max(live))
        while len(marks) < steps - 1 and done + tokens >= (len(marks) + 1) * per_step:
            at = t + dt * ((len(marks) + 1) * per_step - done) / tokens
            kv = np.concatenate(kvs).astype(np.float64)
            flops = 2.0 * shape.matmul_params * kv.sum() + 2.0 * float(np.sum(kv * kv)) * (
                shape.q_dim * shape.layers
            )
            marks.append((at, flops))
        t, done = t + dt, done + tokens
        if len(marks) == steps - 1:
            break
    decode = (marks[-1][0] - marks[0][0]) / (steps - 2)
    reprefill = float(np.mean([fl for _, fl in marks])) / (chips * pk.bf16_flops)
    return {"decode": decode, "reprefill": reprefill, "tokens_per_step": per_step}


def async_modes(cfg: Config, target, model_cfg, lengths: np.ndarray, est: dict, *,
                prompt_len: int, gen_rounds: float, compiled: dict | None = None,
                stream_steps: int = 4, seed: int = 0) -> dict:  # fmt: skip
    """Seconds per step of sync (`est`, the colocated estimate), `one_step` and `stream` with
    `separate` placement at every rollout split (`rollout_splits`): R chips decode while the
    other T score and train, concurrently.

    - sync: rollout (prefill + decode) on all chips, then training on all chips (`est`).
    - one_step: the rollout of step k+1 (still drained: its longest response ends it, the same
      scheduler over R's batch shards) runs while step k trains; step = max(rollout on R,
      scoring + update + optimizer on T) + weight sync.
    - stream: the rollout never drains (`stream_rollout`); step = max(prefill + steady-state
      decode + re-prefill of the carried rows on R, training on T) + weight sync.

    The rollout's rows per batch shard stay the full mesh's (`rollout.max_num_seqs` over its
    shards: the KV budget a chip was sized for), so the rollout's total rows scale with R.
    Training takes the same kept responses and compiler factors as `est`, on a T-chip mesh.
    `balanced_bound`: the step of a split that scales perfectly (any R, no weight sync), the
    rollout at its decode floor: rollout floor + training of the colocated estimate, since
    max(a C / R, b C / (C - R)) >= a + b."""
    pk, chips, r = target.peaks, target.chips, cfg.rollout
    itemsize = compute_itemsize(cfg)
    shape = Shape.of(model_cfg, itemsize)
    cal = compiler_factors(compiled, cfg, target, shape) if compiled else {}
    f = {s: cal[s][0] if cal.get(s, (None,))[0] is not None else 1.0 for s in STAGES}
    sub = submesh(cfg)
    seqs = -(-(r.max_num_seqs or 512) // batch_shards(cfg, chips))
    kept = lengths[: cfg.data.train_batch_size * r.n]
    sync_w = weight_sync_seconds(shape, itemsize, max(cfg.mesh.tensor, 1), pk)
    sec = est["seconds"]
    roll = sec["prefill"] + sec["decode"]
    rows = [{"mode": "sync", "rollout_chips": chips, "trainer_chips": chips,
             "rollout_seconds": roll, "train_seconds": est["total_seconds"] - roll,
             "weight_sync_seconds": 0.0, "step_seconds": est["total_seconds"],
             "rollout_floor_seconds": est["floor_seconds"]["prefill"]
             + est["floor_seconds"]["decode"]}]  # fmt: skip
    for rc in rollout_splits(cfg, target):
        tc = chips - rc
        ro = rollout_costs(sub, pk, shape, lengths, prompt_len, rc, seqs)
        tr = train_costs(sub, dataclasses.replace(target, chips=tc), shape, kept, prompt_len, f)
        train = sum(tr["seconds"].values())
        st = stream_rollout(sub, pk, shape, lengths, prompt_len, rc, seqs, stream_steps, seed)
        floor = gen_rounds * (ro["prefill"] + ro["decode_floor"])
        one = gen_rounds * (ro["prefill"] + ro["decode"])
        stream = gen_rounds * (ro["prefill"] + st["decode"]) + st["reprefill"]
        for mode, roll_s, extra in (
            ("one_step", one, {"decode_seconds": gen_rounds * ro["decode"]}),
            ("stream", stream, {"decode_seconds": gen_rounds * st["decode"],
                                "reprefill_seconds": st["reprefill"]}),
        ):  # fmt: skip
            rows.append({"mode": mode, "rollout_chips": rc, "trainer_chips": tc,
                         "rollout_seconds": roll_s, "train_seconds": train,
                         "weight_sync_seconds": sync_w,
                         "step_seconds": max(roll_s, train) + sync_w,
                         "rollout_floor_seconds": floor,
                         "prefill_seconds": gen_rounds * ro["prefill"], **extra,
                         "train_stage_seconds": tr["seconds"]})  # fmt: skip
    rows.sort(key=lambda row: ASYNC_MODES.index(row["mode"]))  # stable: splits ascending
    sync_step = est["total_seconds"]
    best = {}
    for row in rows:
        row["ratio"] = row["step_seconds"] / sync_step
        if row["mode"] not in best or row["step_seconds"] < best[row["mode"]]["step_seconds"]:
            best[row["mode"]] = row
    for row in rows:
        row["best"] = best[row["mode"]] is row
    train_sync = sum(sec[s] for s in STAGES if s not in ("prefill", "decode"))
    bound = rows[0]["rollout_floor_seconds"] + train_sync
    return {
        "splits": rollout_splits(cfg, target),
        "rows_per_rollout_shard": seqs,
        "stream_steps": stream_steps,
        "rows": rows,
        "best": {m: best[m] for m in ASYNC_MODES if m in best},
        "balanced_bound_seconds": bound,
        "balanced_bound_ratio": bound / sync_step,
    }


def async_report(a: dict) -> str:
    """The async modes as text: a markdown table of every mode at every split (the best split
    of each mode marked), and the balanced bound."""
    lines = [
        "| mode | rollout chips | trainer chips | rollout s | train s | weight sync s | step s "
        "| x sync | best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in a["rows"]:
        lines.append(
            f"| {row['mode']} | {row['rollout_chips']} | {row['trainer_chips']} | "
            f"{row['rollout_seconds']:.4g} | {row['train_seconds']:.4g} | "
            f"{row['weight_sync_seconds']:.3g} | {row['step_seconds']:.4g} | "
            f"{row['ratio']:.2f} | {'yes' if row['best'] else ''} |"
        )
    st = a["best"].get("stream")
    if st is not None:
        lines.append(
            f"stream at its best split: decode {st['decode_seconds']:.4g} s a step (floor "
            f"{st['rollout_floor_seconds']:.4g} s with prefill), re-prefill of carried rows "
            f"{st['reprefill_seconds']:.3g} s; {a['rows_per_rollout_shard']} rows per rollout "
            f"shard; steady state from {a['stream_steps']} steps back to back"
        )
    lines.append(
        f"balanced bound (perfect split, rollout at its decode floor, no weight sync): "
        f"{a['balanced_bound_seconds']:.4g} s = {a['balanced_bound_ratio']:.2f} x sync"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Prints (and with --json writes) the step-time estimate of the config on --topology; exit 0,
    or 2 on a bad config, topology, file or value."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--topology", required=True, help="TPU slice: v5p-8 ... v5e-N, v6e-N, v4-N")
    ap.add_argument("--lengths", default="synthetic", help="synthetic or a file of lengths")
    ap.add_argument("--gen-rounds", type=float, default=1.0, help="generation rounds a step")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens (default min(512, max))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-config", help="config.json (or its dir) of the model")
    ap.add_argument("--json", help="also write the estimate as JSON to this file")
    ap.add_argument("--compiled", metavar="FILE",
                    help="compile_check --time --json report of this run and target: cost its "
                    "programs at the compiler's figures")  # fmt: skip
    ap.add_argument("--async-modes", action="store_true",
                    help="also estimate one_step and stream with separate placement at every "
                    "rollout / trainer split and print them beside sync")  # fmt: skip
    ap.add_argument(
        "--stream-steps",
        type=int,
        default=4,
        help="steps' worth of prompts the stream model runs back to back (>= 3)",
    )
    a = ap.parse_args(argv)
    if a.config is None:
        a.config = str(DEFAULT_CONFIG)
    cfg = config_from_args(a)
    from htpo_jax.models.model_config import ModelConfig

    try:
        target = resolve_target(a.topology, None, None)
        model_cfg = ModelConfig.from_pretrained(model_config_path(cfg, a.model_config).parent)
        r = cfg.rollout
        if a.lengths == "synthetic":
            lengths = draw_lengths(cfg.data.gen_batch_size, r.n, r.max_response_length, a.seed)
        else:
            lengths = read_lengths(a.lengths, r.max_response_length)
            lengths = lengths[: len(lengths) // r.n * r.n]
        plen = a.prompt_len or min(512, cfg.data.max_prompt_length)
        compiled = json.loads(Path(a.compiled).read_text()) if a.compiled else None
        est = estimate(cfg, target, model_cfg, lengths, prompt_len=plen, gen_rounds=a.gen_rounds,
                       compiled=compiled)  # fmt: skip
        if a.async_modes:
            est["async"] = async_modes(cfg, target, model_cfg, lengths, est, prompt_len=plen,
                                       gen_rounds=a.gen_rounds, compiled=compiled,
                                       stream_steps=a.stream_steps, seed=a.seed)  # fmt: skip
    except (TargetError, FileNotFoundError, ValueError) as e:
        print(f"step_time: {e}", file=sys.stderr)
        return 2
    print(report(est))
    if "async" in est:
        print(async_report(est["async"]))
    if a.json:
        Path(a.json).write_text(json.dumps(est, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
