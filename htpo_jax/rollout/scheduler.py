"""The engine's host side: the page allocator, admission, page growth, preemption and packing of
the live rows into a compiled batch. Pure numpy / Python; the device programs are in engine.py.

Every piece of per-row state lives here (page list, cache length, next token, step), so the slot
a row occupies is only its position in the packed arrays of one decode call: packing the live
rows into the smallest bucket that holds them IS the compaction, and it costs nothing.

Row r of a call is sample r % n of prompt r // n. Its cache holds the prompt's tokens but the last
(positions 0 .. L-2, written once per prompt by the prefill) and then its own tokens: the first
decode step feeds the prompt's last token and samples response token 0, so every sampled token,
the first included, comes from the same decode program.

Prompt pages: the prompt owns its prefilled pages until all its n rows are admitted. Its full
pages are shared by the rows (reference counts); the partial last page (when L-1 is not a multiple
of page_size) is copied into a private page of each row (copy-on-write: the rows write their own
tokens after the prompt's). Pages are returned to the pool only after the programs that read them
were dispatched (`end_round`), so a page freed in a round cannot be overwritten before its last
read (programs run in dispatch order: each takes the pool the previous one returned).

Shards: under a mesh, each batch shard has its own scheduler and page pool and starts with a
contiguous block of the rows. A shard whose queue runs dry while it has free slots steals half of
what another shard's queue cannot admit (`steal_work`): responses of one prompt tend to be alike in
length, so without it the shard that drew the long prompts would decode alone at the end while the
others idle in the same lockstep programs.

Preemption: when the live rows cannot all grow by one chunk, the most recently admitted rows give
their pages back and return to the front of the queue; they restart from scratch later. Their
outputs are the same (a row's randomness depends only on its id and step), only work is lost.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque

import jax
import numpy as np


def pow2_at_least(x: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(x, minimum)."""
    return 1 << max(0, max(x, minimum) - 1).bit_length()


class PageAllocator:
    """Reference-counted pages 1 .. num_pages - 1 (page 0 is the trash page, never handed out)."""

    def __init__(self, num_pages: int):
        self.refs = [0] * num_pages  # plain lists: this runs per row, numpy indexing is slower
        self.free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        """Pages free now."""
        return len(self.free)

    def alloc(self, k: int) -> list[int]:
        """`k` free pages, each with one reference; RuntimeError when fewer are free."""
        if k == 0:
            return []
        if k > len(self.free):
            raise RuntimeError(f"page pool exhausted: {k} pages wanted, {len(self.free)} free")
        pages = self.free[-k:][::-1]
        del self.free[-k:]
        for p in pages:
            self.refs[p] = 1
        self.peak_used = max(self.peak_used, len(self.refs) - 1 - len(self.free))
        return pages

    def incref(self, pages) -> None:
        """One more reference to each of `pages`."""
        for p in pages:
            self.refs[p] += 1

    def release(self, pages) -> None:
        """One reference fewer to each of `pages`; a page whose count reaches 0 is free again."""
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)


@dataclasses.dataclass
class _Prompt:
    ids: np.ndarray  # [L] the real tokens
    pages: list[int] | None = None  # prefilled pages of tokens 0 .. L-2 (None: not prefilled)
    unadmitted: int = 0  # rows of this prompt queued here, not yet admitted


@dataclasses.dataclass
class _Row:
    row: int  # global row id (its key)
    prompt: int
    pages: list[int]
    kv_len: int  # tokens in the cache
    next_tok: int  # the token the next step feeds
    step: int = 0  # response index of the next sampled token
    admitted_at: int = 0
    _arr: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    _arr_n: int = 0  # pages[:_arr_n] are copied into _arr

    def page_array(self) -> np.ndarray:
        """`pages` as int32, converting only what was appended since the last call (a row's
        pages only ever grow): packing a long row costs a copy, not a list conversion."""
        n = len(self.pages)
        if n > len(self._arr):
            grown = np.zeros(max(n, 2 * len(self._arr)), np.int32)
            grown[: self._arr_n] = self._arr[: self._arr_n]
            self._arr = grown
        if n > self._arr_n:
            self._arr[self._arr_n : n] = self.pages[self._arr_n : n]
            self._arr_n = n
        return self._arr[:n]


# The plans are pytrees: their arrays are the leaves, in the order of their data fields, which is
# the order the engine's programs take them in (`jax.tree.leaves(plan)`); `rows` is host metadata.
DECODE_ARRAYS = ("page_table_sp", "kv_len_s", "tok_s", "step_s", "row_s", "active_s",
                 "copy_src_s", "copy_dst_s")  # fmt: skip


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=list(DECODE_ARRAYS), meta_fields=["rows"]
)
@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """One decode call's packed inputs (S slots, Pb pages per row) and the rows in those slots."""

    rows: list  # the live _Row objects, slot order
    page_table_sp: np.ndarray  # [S, Pb] int32
    kv_len_s: np.ndarray  # [S] int32
    tok_s: np.ndarray  # [S] int32
    step_s: np.ndarray  # [S] int32
    row_s: np.ndarray  # [S] int32
    active_s: np.ndarray  # [S] bool
    copy_src_s: np.ndarray  # [S] int32 copy-on-write: page copies done before decoding
    copy_dst_s: np.ndarray  # [S] int32


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["ids_bt", "len_b", "page_table_bp"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """One prefill call's packed inputs: Bp prompts right-padded to Tp tokens, their page tables."""

    ids_bt: np.ndarray  # [Bp, Tp] int32, right padded: tokens 0 .. L-2 of each prompt
    len_b: np.ndarray  # [Bp] int32, L - 1 (0 for padding prompts)
    page_table_bp: np.ndarray  # [Bp, Tp / page_size] int32 (0 = trash for padding)


class Scheduler:
    """Admission, growth and packing for one `generate` call (see the module docstring)."""

    def __init__(self, prompts: list[np.ndarray], n: int, max_new_tokens: int, *, page_size: int,
                 num_pages: int, max_num_seqs: int, steps_per_call: int, min_slots: int = 1,
                 prefill_len_bucket=None, rows=None):  # fmt: skip
        """prompts: every prompt of the call; rows: the ids of the rows this scheduler starts
        with (None: all of them). Row ids index the call's output arrays and pick the keys."""
        self.n, self.max_new, self.ps = n, max_new_tokens, page_size
        self.k, self.max_num_seqs, self.min_slots = steps_per_call, max_num_seqs, min_slots
        self.prefill_len_bucket = prefill_len_bucket or (lambda t: pow2_at_least(t, 16))
        self.prompts = [_Prompt(ids=np.asarray(p, np.int32)) for p in prompts]
        self.alloc = PageAllocator(num_pages)
        self.waiting: deque[int] = deque()
        self.take(range(len(prompts) * n) if rows is None else rows)
        self.live: list[_Row] = []
        self.round = 0
        self.preemptions = 0
        self._to_release: list[list[int]] = []
        self._copies: list[tuple[int, int]] = []
        self._prefill: list[int] = []
        self.finished_rows: list[_Row] = []
        worst = self._pages(max(map(len, prompts), default=1) - 1 + self.max_new) + 1
        if worst > num_pages - 1:
            raise ValueError(
                f"rollout.num_pages: {num_pages - 1} pages of {page_size} tokens cannot hold one "
                f"row (prompt + {max_new_tokens} tokens needs {worst}); raise num_pages"
            )

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.ps)

    def _feeds(self, r: _Row) -> int:
        """Tokens row r feeds in the next call (at most; fewer if it samples EOS)."""
        return min(self.k, self.max_new - r.step)

    def _growth(self, r: _Row) -> int:
        return max(0, self._pages(r.kv_len + self._feeds(r)) - len(r.pages))

    @property
    def done(self) -> bool:
        """True when no row is waiting or live."""
        return not self.waiting and not self.live

    @property
    def free_slots(self) -> int:
        """Decode slots not held by a live row."""
        return self.max_num_seqs - len(self.live)

    # ------------------------------------------------------------------ work stealing
    def take(self, rows) -> None:
        """Queues rows (at the back)."""
        for row in rows:
            self.prompts[row // self.n].unadmitted += 1
            self.waiting.append(row)

    def give(self, k: int) -> list[int]:
        """Hands the last k waiting rows to another scheduler. A prompt prefilled here for rows
        that all left lets go of its pages (after this round's programs, like any release)."""
        rows = [self.waiting.pop() for _ in range(k)][::-1]
        for row in rows:
            p = self.prompts[row // self.n]
            p.unadmitted -= 1
            if p.unadmitted == 0 and p.pages is not None:
                self._to_release.append(p.pages)
                p.pages = None
        return rows

    # ------------------------------------------------------------------ admission
    def _admission_cost(self, row: int) -> int:
        p = self.prompts[row // self.n]
        prefix = len(p.ids) - 1
        cost = self._pages(prefix) if p.pages is None else 0
        own_from = prefix // self.ps  # the first page the row writes into is its own
        return cost + self._pages(prefix + min(self.k, self.max_new)) - own_from

    def _admit(self, row: int) -> None:
        i = row // self.n
        p = self.prompts[i]
        prefix = len(p.ids) - 1
        if p.pages is None:
            p.pages = self.alloc.alloc(self._pages(prefix))
            if prefix:
                self._prefill.append((p.ids, p.pages))
        n_full = prefix // self.ps
        shared = p.pages[:n_full]
        self.alloc.incref(shared)
        r = _Row(row=row, prompt=i, pages=list(shared), kv_len=prefix, next_tok=int(p.ids[-1]))
        r.admitted_at = self.round
        if prefix % self.ps:
            (own,) = self.alloc.alloc(1)
            self._copies.append((p.pages[n_full], own))
            r.pages.append(own)
        r.pages += self.alloc.alloc(self._growth(r))
        p.unadmitted -= 1
        if p.unadmitted == 0:  # every row has its references: the prompt lets go of its own
            self._to_release.append(p.pages)
            p.pages = None
        self.live.append(r)

    def _preempt(self, r: _Row) -> None:
        self.live.remove(r)
        self.alloc.release(r.pages)  # only programs already dispatched read them
        p = self.prompts[r.prompt]
        p.unadmitted += 1
        self.waiting.appendleft(r.row)
        self.preemptions += 1

    # ------------------------------------------------------------------ one round
    def plan(self) -> tuple[PrefillPlan | None, DecodePlan]:
        """`advance()`, then `pack()` at this scheduler's own bucket sizes."""
        self.advance()
        return self.pack(*self.needs())

    def advance(self) -> None:
        """Grows the live rows' pages by one call (preempting if the pool runs short) and admits
        waiting rows while slots and pages allow."""
        self.round += 1
        need = sum(self._growth(r) for r in self.live)
        while need > self.alloc.num_free and len(self.live) > 1:
            youngest = max(self.live, key=lambda r: (r.admitted_at, r.row))
            need -= self._growth(youngest)
            self._preempt(youngest)
        for r in self.live:
            r.pages += self.alloc.alloc(self._growth(r))
        while self.waiting and len(self.live) < self.max_num_seqs:
            if self._admission_cost(self.waiting[0]) > self.alloc.num_free:
                break
            self._admit(self.waiting.popleft())
        if not self.live and self.waiting:
            raise RuntimeError("engine: no row could be admitted (page pool too small)")

    def needs(self) -> tuple[int, int, int, int]:
        """The buckets this round needs: (slots S, pages per row Pb, prefill prompts Bp, prefill
        length Tp); 0 for a prefill it does not have. Several schedulers (one per device) pack
        at the max of their needs, so that one compiled program serves them all."""
        s = max(self.min_slots, pow2_at_least(len(self.live)))
        pb = pow2_at_least(max((len(r.pages) for r in self.live), default=1))
        if not self._prefill:
            return s, pb, 0, 0
        tp = self.prefill_len_bucket(max(len(ids) - 1 for ids, _ in self._prefill))
        return s, pb, pow2_at_least(len(self._prefill)), -(-tp // self.ps) * self.ps

    def pack(self, s: int, pb: int, bp: int, tp: int) -> tuple[PrefillPlan | None, DecodePlan]:
        """This round's device inputs at the given buckets (each >= this scheduler's `needs`;
        bp = 0: no prefill program runs this round)."""
        return (self._pack_prefill(bp, tp) if bp else None), self._pack_decode(s, pb)

    def _pack_prefill(self, bp: int, tp: int) -> PrefillPlan:
        prompts, self._prefill = self._prefill, []
        ids = np.zeros((bp, tp), np.int32)
        lens = np.zeros(bp, np.int32)  # padding prompts: length 0, every token to the trash page
        table = np.zeros((bp, tp // self.ps), np.int32)
        for b, (prompt_ids, pages) in enumerate(prompts):
            ids[b, : len(prompt_ids) - 1] = prompt_ids[:-1]
            lens[b] = len(prompt_ids) - 1
            table[b, : len(pages)] = pages
        return PrefillPlan(ids_bt=ids, len_b=lens, page_table_bp=table)

    def _pack_decode(self, s: int, pb: int) -> DecodePlan:
        rows = self.live
        table = np.zeros((s, pb), np.int32)
        kv_len, tok, step, row = (np.zeros(s, np.int32) for _ in range(4))
        active = np.zeros(s, bool)
        for j, r in enumerate(rows):
            table[j, : len(r.pages)] = r.page_array()
            kv_len[j], tok[j], step[j], row[j], active[j] = r.kv_len, r.next_tok, r.step, r.row, 1
        src, dst = np.zeros(s, np.int32), np.zeros(s, np.int32)
        for j, (a, b) in enumerate(self._copies):
            src[j], dst[j] = a, b
        self._copies = []
        return DecodePlan(list(rows), table, kv_len, tok, step, row, active, src, dst)

    def commit(self, plan: DecodePlan, tokens_sk: np.ndarray, eos_ids, out_tokens, out_logp,
               logp_sk: np.ndarray) -> None:  # fmt: skip
        """Takes one call's sampled tokens [S, K] (and log-probs) into the output arrays, ends
        the rows that sampled EOS or reached max_new_tokens, and returns pages to the pool."""
        k = tokens_sk.shape[1]
        eos_sk = np.isin(tokens_sk, np.asarray(eos_ids, np.int32)) if eos_ids else None
        still = []
        for j, r in enumerate(plan.rows):
            e = min(k, self.max_new - r.step)
            hit = False
            if eos_sk is not None and eos_sk[j, :e].any():
                e = int(np.argmax(eos_sk[j, :e])) + 1
                hit = True
            out_tokens[r.row, r.step : r.step + e] = tokens_sk[j, :e]
            out_logp[r.row, r.step : r.step + e] = logp_sk[j, :e]
            r.kv_len += e
            r.step += e
            r.next_tok = int(tokens_sk[j, e - 1])
            if hit or r.step >= self.max_new:
                self._to_release.append(r.pages)
                self.finished_rows.append(r)
            else:
                still.append(r)
        self.live = still

    def end_round(self) -> None:
        """Returns this round's freed pages to the pool (after its programs were dispatched)."""
        for pages in self._to_release:
            self.alloc.release(pages)
        self._to_release = []


def steal_work(scheds: list[Scheduler]) -> int:
    """Balances the shards' queues before a round (each shard's `advance`): a scheduler with
    nothing waiting and free slots takes half (rounded up) of the rows that the fullest queue's
    own scheduler cannot admit now, from the back of that queue, so a prompt's samples mostly
    move together. Depends only on the schedulers' state: every process, running every shard's
    scheduler, moves the same rows. Returns the number of rows moved."""
    moved = 0
    for thief in scheds:
        if thief.waiting or thief.free_slots <= 0:
            continue
        victim = max(scheds, key=lambda s: len(s.waiting) - max(s.free_slots, 0))
        k = (len(victim.waiting) - max(victim.free_slots, 0) + 1) // 2
        if k > 0:
            thief.take(victim.give(k))
            moved += k
    return moved
