"""Asynchronous RL (`trainer.async_mode`): rollouts that run while the trainer updates.

Both modes are defined by program order, never by wall-clock races: in every step the rollout
work that overlaps the update is a fixed piece (the next step's rollout, or one generation
round), sampled with the weights from before the update, and joined before the step ends. So a
run is reproducible from its seed, every host takes the same decisions (from the all-gathered
rewards, as a synchronous step), and validation, saving and stop checks see no rollout in flight.

- `OneStep` (verl's one-step-off-policy): step k trains on the rollout made while step k-1
  trained, i.e. with the weights step k-1 started from; the rollout of step k+1 runs during the
  update of step k with the weights of step k (before its update). Step 1 samples first, on-policy.
- `Stream`: generation rounds of `rollout.segment_tokens` new tokens per response over a pool of
  in-flight prompt groups, refilled from the data as groups finish; a response longer than one
  round carries over to the next round, and across weight updates (`rollout.partial`: continue,
  re-prefilling its prefix under the new weights with each token's log-prob kept from the policy
  that sampled it; or restart from its prompt). Finished groups are scored, filtered (dynamic
  sampling) and buffered; a step takes the stalest `data.train_batch_size` buffered groups whose
  staleness (current version - the oldest version that sampled one of their tokens) is at most
  `trainer.max_staleness`, dropping (and counting) older ones, running rounds with the current
  weights until enough are there; one more round runs during the update.

Policy versions count RL steps: the weights at the start of step k are version k-1.

Placement (`infra.placement`): with `separate` the rollout runs on its own devices, in a thread,
with its own `HostSync` namespace and sampler (the two threads never share a sync sequence), and
the weights reach it through `WeightSync` once a step; `colocated` runs it in the main thread
after the update is dispatched (the overlap is the host side of the rollout against the device
work), on a copy of the pre-update weights (the update donates them).

Stops: a checkpoint holds the trainer state and the data position; rollouts drawn but not yet
trained (the pending next-step rollout, the stream's buffer and in-flight responses) are dropped,
and their prompts are drawn again after a resume (`DataState.requeue`, or the position before the
pending rollout): nothing is lost or trained twice, and the first step after a resume samples
with the restored weights.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from htpo_jax.infra import distributed as dist
from htpo_jax.infra.placement import WeightSync
from htpo_jax.infra.sharding import to_host
from htpo_jax.models.hf_io import pad_id
from htpo_jax.rl import advantages as adv_lib
from htpo_jax.rl.sample import engine_config, score_rollout, stop_tokens
from htpo_jax.run import stages
from htpo_jax.run.data import DataState, PromptBatch
from htpo_jax.run.stages import KeptGroups, SamplingExhausted


class _Background:
    """One function run in a thread; `join` returns its result or raises its exception."""

    def __init__(self, fn):
        self.result = self.error = None
        self.t0 = time.perf_counter()
        self.t1 = self.t0

        def run():
            try:
                self.result = fn()
            except BaseException as e:  # re-raised in the main thread by join()
                self.error = e
            self.t1 = time.perf_counter()

        self.thread = threading.Thread(target=run, name="htpo-rollout", daemon=True)
        self.thread.start()

    def join(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


def _portable(key):
    """`key` as an uncommitted array (its data read to the host): usable under the rollout mesh,
    whatever mesh the run's key lives on."""
    return jax.random.wrap_key_data(np.asarray(jax.random.key_data(key)))


class Rollouts:
    """The rollout side of an asynchronous run (the `OneStep` / `Stream` base): where it runs,
    the weights it samples with, and the overlapped piece of work of a step."""

    def __init__(self, p: stages.Programs, s: stages.Services, cfg, rollout_mesh=None):
        self.cfg, self.mesh = cfg, rollout_mesh
        if rollout_mesh is None:  # colocated: the run's own sampler and sync, main thread only
            self.p, self.s, self.sync = p, s, None
        else:
            sync = dist.HostSync("rollout", cfg.trainer.collective_timeout_s)
            self.p = dataclasses.replace(p, sampler=dataclasses.replace(p.sampler, sync=sync))
            self.s, self.sync = (
                dataclasses.replace(s, sync=sync),
                WeightSync(rollout_mesh, p.sampler.dtype),
            )
        self.synced = None  # (step, the weights on the rollout mesh): one sync a step
        self.bg: _Background | None = None
        self.work = None  # colocated: the overlapped piece, run by `run_overlapped`
        self.stats: dict = {}

    # -- weights and where the work runs
    def behaviour(self, params, step: int, copy: bool):
        """The weights step `step` samples with (its pre-update `params`): synced to the rollout
        mesh once a step (separate), or `params` themselves / a copy when the update is about
        to donate them (colocated)."""
        if self.sync is None:
            return jax.tree.map(jnp.copy, params) if copy else params
        if self.synced is None or self.synced[0] != step:  # take and start share one copy
            self.synced = (step, self.sync(params))
            self.stats.update(self.sync.stats)
        return self.synced[1]

    def _run(self, fn):
        if self.mesh is None:
            return fn()
        with jax.set_mesh(self.mesh):
            return fn()

    def start(self, params, rng, step: int) -> None:
        """Starts the piece of rollout work that overlaps step `step`'s update, sampled with
        `params` (the pre-update weights): in a thread on the rollout devices (separate), or
        held for `run_overlapped` (colocated)."""
        work = self.overlapped(self.behaviour(params, step, copy=True), rng, step)
        if self.mesh is None:
            self.work = work
        else:
            self.bg = _Background(lambda: self._run(work))

    def run_overlapped(self) -> None:
        """Colocated: runs the held piece now (after the update was dispatched)."""
        if self.work is not None:
            work, self.work = self.work, None
            work()

    def join(self, update_window: tuple[float, float]) -> dict:
        """Waits for the overlapped piece; returns its timing (and with separate placement
        `async/overlap`: the share of the step's update window the rollout was busy in)."""
        self.run_overlapped()
        out, self.stats, self.synced = dict(self.stats), {}, None  # the rollout copy goes
        if self.bg is not None:
            bg, self.bg = self.bg, None
            bg.join()
            u0, u1 = update_window
            both = max(0.0, min(bg.t1, u1) - max(bg.t0, u0))
            out["time/rollout_overlapped"] = bg.t1 - bg.t0
            out["async/overlap"] = both / max(max(bg.t1, u1) - min(bg.t0, u0), 1e-9)
        return out

    # -- the modes fill these in
    def take(self, params, rng, step: int) -> tuple[KeptGroups, dict]:
        """The kept groups step `step` trains on, and their rollout statistics."""
        raise NotImplementedError

    def overlapped(self, behaviour, rng, step: int):
        """A zero-argument function: the work that overlaps step `step`'s update."""
        raise NotImplementedError

    def data_state(self) -> DataState:
        """The data position a checkpoint saves (rollouts not yet trained are dropped, their
        prompts drawn again after a resume)."""
        raise NotImplementedError


class OneStep(Rollouts):
    """`trainer.async_mode: one_step` (module docstring)."""

    pending: tuple[KeptGroups, dict] | None = None
    before: DataState | None = None  # the data position before the pending rollout drew

    def _collect(self, behaviour, key, version: int):
        key = _portable(key)
        return self._run(lambda: stages.collect(self.p, self.s, self.cfg, behaviour, key, version))

    def take(self, params, rng, step: int) -> tuple[KeptGroups, dict]:
        """The rollout made during the previous step's update, or (first step) one made now."""
        if self.pending is None:  # the first step (or the first after a resume): on-policy
            key = jax.random.fold_in(rng, step)  # the key of a synchronous step
            kept, stats = self._collect(self.behaviour(params, step, copy=False), key, step - 1)
        else:
            (kept, stats), self.pending = self.pending, None
        self.before = None
        return kept, stats

    def overlapped(self, behaviour, rng, step: int):
        """The rollout of step + 1, with `behaviour` (the weights step `step` started from)."""
        self.before = self.s.stream.state
        key = jax.random.fold_in(rng, step + 1)  # now: the update donates `rng` with the state

        def work():  # the rollout of step + 1, with the weights of step (version step - 1)
            self.pending = self._collect(behaviour, key, step - 1)

        return work

    def data_state(self) -> DataState:
        """The position before the pending rollout drew its prompts (it is dropped)."""
        return self.before if self.before is not None else self.s.stream.state


@dataclasses.dataclass
class _Group:
    """One prompt in flight in `Stream`: its tokens, and its n responses as they grow."""

    draw: int  # draw order (the buffer and the resume queue keep it)
    row_id: int  # dataset row
    prompt: np.ndarray  # [P_i] int32, the prompt's real tokens
    ground_truth: str
    data_source: str
    tokens: np.ndarray  # [n, R] int32
    log_probs: np.ndarray  # [n, R] float32
    version: np.ndarray  # [n, R] int32
    length: np.ndarray  # [n] int
    eos: np.ndarray  # [n] bool: ended with EOS
    done: np.ndarray  # [n] bool: EOS or the length cap


class Stream(Rollouts):
    """`trainer.async_mode: stream` (module docstring)."""

    def __init__(self, p, s, cfg, rollout_mesh=None):
        super().__init__(p, s, cfg, rollout_mesh)
        r, a = cfg.rollout, cfg.algorithm
        self.n, self.cap = r.n, r.max_response_length
        self.segment = r.segment_tokens or max(self.cap // 4, 1)
        need = cfg.data.train_batch_size
        self.in_flight_target = cfg.data.gen_batch_size if a.dynamic_sampling else need
        self.groups: list[_Group] = []  # in flight, in draw order
        self.buffer: list[tuple[_Group, KeptGroups, int]] = []  # (group, kept, oldest version)
        self.draws = 0
        self.counts = dict(dropped_stale=0, restarted=0, filtered=0, finished=0)
        self.finished_rounds: list = []  # this step's scored groups (for round_stats)
        self.before: DataState | None = None  # the position before the overlapped round

    # -- one generation round
    def _refill(self) -> None:
        want = self.in_flight_target - len(self.groups)
        if want <= 0:
            return
        batch = self.s.stream.next_batch(want)
        n, cap = self.n, self.cap
        for i in range(len(batch)):
            m = np.asarray(batch.attention_mask[i]) > 0
            self.groups.append(_Group(
                draw=self.draws, row_id=batch.row_ids[i], prompt=np.asarray(batch.input_ids[i])[m],
                ground_truth=batch.ground_truth[i], data_source=batch.data_source[i],
                tokens=np.zeros((n, cap), np.int32), log_probs=np.zeros((n, cap), np.float32),
                version=np.zeros((n, cap), np.int32), length=np.zeros(n, np.int64),
                eos=np.zeros(n, bool), done=np.zeros(n, bool),
            ))  # fmt: skip
            self.draws += 1

    def _restart_stale(self, version: int) -> None:
        for g in self.groups:
            for j in np.flatnonzero(~g.done & (g.length > 0)):
                if g.version[j, 0] < version:
                    g.length[j] = 0
                    self.counts["restarted"] += 1

    def round(self, behaviour, key, version: int) -> None:
        """One generation round with `behaviour` (policy `version`): every unfinished response
        of the in-flight groups gets up to `segment` new tokens; finished groups are scored,
        filtered and buffered."""
        if self.cfg.rollout.partial == "restart":
            self._restart_stale(version)
        self._refill()
        rows = [(g, j) for g in self.groups for j in np.flatnonzero(~g.done)]
        seqs = [np.concatenate([g.prompt, g.tokens[j, : g.length[j]]]) for g, j in rows]
        mult = self.cfg.data.pad_to_multiple
        width = -(-max(len(x) for x in seqs) // mult) * mult
        tok = self.p.tokenizer
        ids = np.full((len(seqs), width), pad_id(tok), np.int32)  # [rows, width], left padded
        mask = np.zeros((len(seqs), width), np.int32)
        for i, x in enumerate(seqs):
            ids[i, width - len(x) :], mask[i, width - len(x) :] = x, 1
        r = self.cfg.rollout
        ro = self.p.sampler(
            behaviour, ids, mask, max_new_tokens=self.segment, rng=key, n=1,
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, greedy=r.temperature <= 0,
            eos_token_id=stop_tokens(tok), pad_token_id=pad_id(tok), engine=engine_config(r),
        )  # fmt: skip
        ro = to_host(ro)  # every host: the whole rollout (multi-host lockstep)
        new_tok, new_lp = np.asarray(ro.tokens), np.asarray(ro.log_probs)
        new_len, fin = np.asarray(ro.lengths), np.asarray(ro.finished)
        for i, (g, j) in enumerate(rows):
            at = int(g.length[j])
            take = min(int(new_len[i]), self.cap - at)
            g.tokens[j, at : at + take] = new_tok[i, :take]
            g.log_probs[j, at : at + take] = new_lp[i, :take]
            g.version[j, at : at + take] = version
            g.length[j] = at + take
            g.eos[j] = bool(fin[i]) and take == int(new_len[i])
            g.done[j] = g.eos[j] or g.length[j] >= self.cap
        done = [g for g in self.groups if g.done.all()]
        self.groups = [g for g in self.groups if not g.done.all()]
        if done:
            self._score(done)

    def _score(self, done: list[_Group]) -> None:
        n = self.n
        width = max(len(g.prompt) for g in done)
        ids = np.full((len(done), width), pad_id(self.p.tokenizer), np.int32)
        mask = np.zeros((len(done), width), np.int32)
        for i, g in enumerate(done):
            ids[i, width - len(g.prompt) :], mask[i, width - len(g.prompt) :] = g.prompt, 1
        batch = PromptBatch(
            input_ids=ids, attention_mask=mask,
            ground_truth=tuple(g.ground_truth for g in done),
            data_source=tuple(g.data_source for g in done), row_ids=tuple(g.row_id for g in done),
        )  # fmt: skip
        cat = lambda f: np.concatenate([getattr(g, f) for g in done])
        lengths = cat("length")
        rmask = (np.arange(self.cap)[None] < lengths[:, None]).astype(np.int32)
        sc = score_rollout(
            batch, cat("tokens") * rmask, rmask, lengths, cat("eos"), self.p.tokenizer, self.cfg,
            n=n, pools=self.s.pools, sync=self.p.sampler.sync,
            log_probs=cat("log_probs") * rmask, version=cat("version"),
        )  # fmt: skip
        a = self.cfg.algorithm
        metric = (sc.acc if a.dynamic_sampling_metric == "acc" else sc.score).reshape(-1, n)
        keep = np.asarray(adv_lib.dynamic_sampling_keep(metric)) if a.dynamic_sampling else None
        self.finished_rounds.append(sc)
        self.counts["finished"] += len(done)
        for i, g in enumerate(done):
            if keep is not None and not keep[i]:
                self.counts["filtered"] += 1
                continue
            kept = KeptGroups.of_round(sc, np.array([i]), width)
            self.buffer.append((g, kept, int(g.version[:, 0].min())))
        # stalest first (the oldest policy version in the group), then draw order: the groups
        # closest to the staleness bound train before it drops them (with partial=continue the
        # same order as the draws; a restarted response makes its group younger than its draw)
        self.buffer.sort(key=lambda b: (b[2], b[0].draw))

    # -- a step
    def _rounds_key(self, rng, step: int, i: int):
        return _portable(jax.random.fold_in(jax.random.fold_in(rng, step), 1 + i))

    def take(self, params, rng, step: int) -> tuple[KeptGroups, dict]:
        """Rounds with `params` (version step - 1) until enough fresh groups are buffered; the
        oldest `train_batch_size` of them."""
        version, need = step - 1, self.cfg.data.train_batch_size
        self.before = None
        limit = max(self.cfg.algorithm.max_num_gen_batches, 1) * -(-self.cap // self.segment)
        behaviour, rounds = None, 0
        while True:
            self.drop_stale(version)
            if len(self.buffer) >= need:
                break
            if rounds >= limit:
                raise SamplingExhausted(
                    f"stream: {len(self.buffer)} of the {need} prompt groups a step needs after "
                    f"{rounds} generation rounds (algorithm.max_num_gen_batches x "
                    "max_response_length / segment_tokens); the rest were all-correct or "
                    "all-wrong, or too stale (trainer.max_staleness)"
                )
            if behaviour is None:
                behaviour = self.behaviour(params, step, copy=False)
            key = self._rounds_key(rng, step, rounds)
            self._run(lambda k=key, b=behaviour: self.round(b, k, version))
            rounds += 1
        taken = self.pop(need)
        width = max(k.prompt_ids.shape[1] for _, k, _ in taken)
        kept = KeptGroups.concat([k.pad_prompts(width) for _, k, _ in taken], need * self.n)
        self.s.sync.agree("stream buffer", [len(self.buffer), len(self.groups), self.draws])
        stats = self._stats(rounds)
        return kept, stats

    def drop_stale(self, version: int) -> list[_Group]:
        """Drops (and counts) the buffered groups too stale to train under policy `version`."""
        limit = self.cfg.trainer.max_staleness
        stale = [b for b in self.buffer if version - b[2] > limit]
        self.buffer = [b for b in self.buffer if version - b[2] <= limit]
        self.counts["dropped_stale"] += len(stale)
        return [g for g, _, _ in stale]

    def pop(self, need: int) -> list[tuple[_Group, KeptGroups, int]]:
        """The `need` stalest buffered groups (oldest sampling version, then draw order), taken
        out of the buffer."""
        taken, self.buffer = self.buffer[:need], self.buffer[need:]
        return taken

    def _stats(self, rounds: int) -> dict:
        scored, self.finished_rounds = self.finished_rounds, []
        stats = {}
        if scored:
            n_groups = sum(len(sc.lengths) // self.n for sc in scored)
            stats = stages.round_stats(scored, 0, n_groups)
            del stats["filter/kept_prompt_frac"]
        carried = sum(int((~g.done & (g.length > 0)).sum()) for g in self.groups)
        return {
            **stats,
            "filter/gen_batches": rounds,
            "stream/buffer_groups": len(self.buffer),
            "stream/in_flight_groups": len(self.groups),
            "stream/carried_rows": carried,
            **{f"stream/{k}": v for k, v in self.counts.items()},
        }

    def overlapped(self, behaviour, rng, step: int):
        """One generation round with `behaviour` (version step - 1)."""
        key = self._rounds_key(rng, step, -1)  # fold_in(., 0): the overlapped round
        # A stop drops this round whole (also the groups it filters out): the position to save
        # is the one from before it, as if the run had ended with this step.
        self.before = self._position()
        return lambda: self.round(behaviour, key, step - 1)

    def data_state(self) -> DataState:
        """The position before the step's overlapped round, with the rows of the groups then
        buffered or in flight queued first."""
        return self.before if self.before is not None else self._position()

    def _position(self) -> DataState:
        pending = sorted([g for g, _, _ in self.buffer] + self.groups, key=lambda g: g.draw)
        st = self.s.stream.state
        return dataclasses.replace(st, requeue=tuple(g.row_id for g in pending) + st.requeue)


MODES = {"one_step": OneStep, "stream": Stream}
