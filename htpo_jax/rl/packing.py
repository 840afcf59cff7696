"""Token-budget micro-batches: which rows of an update batch go together, and at what width.

Padding every response to the longest one of the step wastes most of the compute on DAPO-like
length distributions (a few responses reach the cap, most are short). Instead the rows are sorted
by response length (longest first) and cut into micro-batches whose token count
`rows x (prompt width + response width)` stays within a budget per batch shard
(`optim.max_tokens_per_micro`, like verl's `ppo_max_token_len_per_gpu`). Each micro-batch is
padded only to its own longest response, rounded up to a *length bucket*.

Compiles stay bounded: the response width of a micro-batch is one of the buckets `m * 2^k` and
`m * 1.5 * 2^k` (m = `data.pad_to_multiple`; at most ~33% padding per row), and its row count is a
function of the bucket alone (the budget divided by the width, rounded down to a multiple of
the batch shards), so a run compiles one program per bucket it meets, not one per step.
The loss stays the exact global token-mean: every micro-batch loss is divided by the token count
of the whole mini-batch (train_step.micro_grads), and filler rows carry no response tokens.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def length_bucket(n: int, multiple: int, cap: int | None = None) -> int:
    """Smallest width >= n among multiple * 2^k and multiple * 3 * 2^(k-1) (64, 96, 128, 192,
    256, ... for multiple 64), at most `cap`."""
    n = max(int(n), 1)
    w = multiple
    while w < n:
        if w % 2 == 0 and w + w // 2 >= n:  # the 1.5x step between two powers of two
            w = w + w // 2
            break
        w *= 2
    return min(w, cap) if cap is not None else w


def rows_for_width(width: int, max_tokens: int, shards: int) -> int:
    """Rows of a micro-batch of `width` tokens per row: the per-shard budget `max_tokens` gives
    each shard `max_tokens // width` rows (at least one); the total is a multiple of `shards`."""
    return max(1, max_tokens // width) * shards


@dataclasses.dataclass(frozen=True)
class Micro:
    """One micro-batch: `rows` indexes the batch (-1 = filler), `width` its response columns."""

    rows: np.ndarray  # [rows_b] int64
    width: int


def response_extent(response_mask_nr: np.ndarray) -> np.ndarray:
    """Per row, 1 + the last response column that counts (0 for rows with none); masks may
    have holes, so this is not the mask's sum."""
    m = np.asarray(response_mask_nr) > 0
    last = m.shape[1] - np.argmax(m[:, ::-1], axis=1)
    return np.where(m.any(1), last, 0)


def plan(
    extent_n: np.ndarray,
    prompt_len: int,
    *,
    max_tokens: int,
    shards: int = 1,
    multiple: int = 64,
    cap: int | None = None,
) -> list[Micro]:
    """Cut rows (response extents `extent_n`) into token-budget micro-batches, longest first.

    A micro-batch takes the width bucket of its longest row and as many rows as that width
    allows; the last one of a width is filled up with filler rows (-1).
    """
    extent_n = np.asarray(extent_n)
    order = np.argsort(-extent_n, kind="stable")
    micros: list[Micro] = []
    i = 0
    while i < len(order):
        width = length_bucket(extent_n[order[i]], multiple, cap)
        n_rows = rows_for_width(prompt_len + width, max_tokens, shards)
        take = order[i : i + n_rows]
        rows = np.full(n_rows, -1, np.int64)
        rows[: len(take)] = take
        micros.append(Micro(rows=rows, width=width))
        i += len(take)
    return micros


def fixed(n_rows: int, micro_rows: int, width: int) -> list[Micro]:
    """`optim.micro_batch_size` micro-batches: rows in order, `micro_rows` each, every one at the
    full response `width` (equal-width micro-batches; `n_rows` a multiple of `micro_rows`)."""
    return [
        Micro(np.arange(i, min(i + micro_rows, n_rows)), width)
        for i in range(0, n_rows, micro_rows)
    ]


def gather(batch, micro: Micro):
    """The host arrays of one micro-batch: rows `micro.rows`, responses cut to `micro.width`.

    Filler rows copy the micro-batch's first row with no response token counted, so the forward
    pass sees an ordinary sequence (no fully masked row) and the loss gets nothing from it.
    """
    rows = np.where(micro.rows >= 0, micro.rows, micro.rows[0])
    filler = micro.rows < 0
    p, w = batch.prompt_len, micro.width

    def cut(x, response: bool):
        x = np.asarray(x)[rows]
        if response:
            x = x[:, :w]
        return x

    def cut_pad(x, response: bool):
        x = cut(x, response)
        if response and x.shape[1] < w:  # the bucket is wider than this step's arrays
            x = np.pad(x, ((0, 0), (0, w - x.shape[1])))
        return x

    rmask = cut_pad(batch.response_mask, True).copy()
    rmask[filler] = 0
    ids = np.asarray(batch.input_ids)[rows, : p + w]
    mask = np.asarray(batch.attention_mask)[rows, : p + w]
    if ids.shape[1] < p + w:  # padding columns: token 0, masked out
        ids = np.pad(ids, ((0, 0), (0, p + w - ids.shape[1])))
        mask = np.pad(mask, ((0, 0), (0, p + w - mask.shape[1])))
    return batch.replace(
        input_ids=ids,
        attention_mask=mask,
        response_mask=rmask,
        old_log_prob=cut_pad(batch.old_log_prob, True) * rmask,
        ref_log_prob=cut_pad(batch.ref_log_prob, True) * rmask,
        advantages=cut_pad(batch.advantages, True) * rmask,
        hard=cut(batch.hard, False),
        correct=cut(batch.correct, False),
    )


def scatter(values_nr: np.ndarray, micro: Micro, out_nr: np.ndarray) -> None:
    """Write a micro-batch's per-token results [rows_b, width] back into `out_nr` (in place)."""
    keep = micro.rows >= 0
    w = min(micro.width, out_nr.shape[1])
    out_nr[micro.rows[keep], :w] = np.asarray(values_nr)[keep][:, :w]


def padding_fraction(attention_mask_nl: np.ndarray, computed_tokens: int) -> float:
    """Share of the computed token slots that are padding (prompt or response)."""
    real = int(np.asarray(attention_mask_nl).sum())
    return 1.0 - real / max(computed_tokens, 1)


def computed_tokens(micros: list[Micro], prompt_len: int) -> int:
    """Token slots the micro-batches compute: rows x (prompt_len + width), filler rows and padding
    included."""
    return sum(len(m.rows) * (prompt_len + m.width) for m in micros)


def widths(max_len: int, multiple: int) -> list[int]:
    """Every bucket width up to `max_len` (the shapes a run can compile)."""
    out, n = [], 1
    while True:
        w = length_bucket(n, multiple, max_len)
        if not out or w != out[-1]:
            out.append(w)
        if w >= max_len:
            return out
        n = w + 1


def largest_micro_shape(
    prompt_len: int, max_response: int, *, max_tokens: int, shards: int, multiple: int
) -> tuple[int, int]:
    """(rows, width) of the micro-batch that holds the most tokens, over all buckets."""
    best = None
    for w in widths(max_response, multiple):
        rows = rows_for_width(prompt_len + w, max_tokens, shards)
        key = rows * (prompt_len + w)
        if best is None or key > best[0] or (key == best[0] and w > best[2]):
            best = (key, rows, w)
    return best[1], best[2]


def n_micro_upper_bound(n_rows: int, prompt_len: int, max_response: int, **kw) -> int:
    """At most how many micro-batches `plan` makes for n_rows rows (every row at the cap)."""
    per = rows_for_width(prompt_len + max_response, kw["max_tokens"], kw.get("shards", 1))
    return math.ceil(n_rows / per)
