"""Prompt data: read parquet / JSONL rows, tokenize with the chat template, batch left-padded.

Row layout (DAPO-Math-17k, AIME parquet files): `prompt` = list of chat messages
`{role, content}`, `reward_model` = `{ground_truth, ...}`, `data_source` = str. JSONL files may use
the same fields, or the flat form `{"prompt": str, "answer": str}`. A row with a missing or empty
prompt or ground truth (or a JSON line that is not JSON, or not UTF-8 text) is skipped and
counted, with one warning per file naming it and the first bad row; a file that is missing or has
no valid row is an error.

Rows are tokenized when drawn (a 1.8M-row parquet file loads in seconds): chat template with
the generation prompt, then encode; prompts longer than `max_prompt_length` keep their last tokens.
Batches are padded on the left to a multiple of `pad_to_multiple`, so jitted code sees few shapes.

Training order: epoch e is a permutation drawn from (seed, e) alone, so the position
`DataState(epoch, index)` is all a checkpoint needs to resume the exact sequence.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.struct
import numpy as np

from htpo_jax.models.hf_io import pad_id

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file that cannot be used at all (missing, unreadable, or without valid rows)."""


@dataclass(frozen=True)
class Row:
    """One valid data row: its chat messages, ground truth and data source."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    ground_truth: str
    data_source: str


@flax.struct.dataclass
class PromptBatch:
    """B prompts, left-padded to P tokens.

    Only the arrays are pytree leaves. The strings and row ids are static metadata
    (pytree_node=False) for the host-side reward and logging: never pass a whole PromptBatch into
    a jitted function, or every batch's strings would trigger a recompile; pass the arrays.
    """

    input_ids: np.ndarray  # [B, P] int32, pad id on the left
    attention_mask: np.ndarray  # [B, P] int32, 1 on prompt tokens
    ground_truth: tuple[str, ...] = flax.struct.field(pytree_node=False)
    data_source: tuple[str, ...] = flax.struct.field(pytree_node=False)
    row_ids: tuple[int, ...] = flax.struct.field(pytree_node=False)  # index into the dataset

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class DataState:
    """Where the training stream stands: the next item is position `index` of epoch `epoch`,
    after the rows of `requeue` (dataset row ids handed back by an asynchronous run that stopped
    with them drawn but not trained: they are served first, in this order)."""

    epoch: int = 0
    index: int = 0
    requeue: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The position as a JSON-ready dict {"epoch", "index"} (and "requeue" when non-empty)."""
        out: dict[str, Any] = {"epoch": self.epoch, "index": self.index}
        if self.requeue:
            out["requeue"] = list(self.requeue)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DataState:
        """The position that `to_json` wrote."""
        requeue = tuple(int(i) for i in d.get("requeue", ()))
        return cls(epoch=int(d["epoch"]), index=int(d["index"]), requeue=requeue)


# ---------------------------------------------------------------------------------------------
# Reading rows


def _text(x) -> str | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int | float):  # numeric answers ("ground_truth": 42)
        return str(x)
    if isinstance(x, str) and x.strip():
        return x
    return None


def _parse_messages(prompt) -> tuple[tuple[str, str], ...] | None:
    text = _text(prompt)
    if isinstance(prompt, str):
        return (("user", text),) if text is not None else None
    if not isinstance(prompt, list | tuple | np.ndarray) or len(prompt) == 0:
        return None
    out = []
    for m in prompt:
        if not isinstance(m, dict):
            return None
        role, content = m.get("role"), _text(m.get("content"))
        if not isinstance(role, str) or not role or content is None:
            return None
        out.append((role, content))
    return tuple(out)


def _parse_row(rec: Any, prompt_key: str, default_source: str) -> tuple[Row | None, str]:
    """A Row, or None and the reason it was skipped."""
    if not isinstance(rec, dict):
        return None, "not an object"
    messages = _parse_messages(rec.get(prompt_key))
    if messages is None:
        return None, f"missing or empty '{prompt_key}'"
    reward_model = rec.get("reward_model")
    gt = None
    if isinstance(reward_model, dict):
        gt = _text(reward_model.get("ground_truth"))
    if gt is None:
        gt = _text(rec.get("answer")) or _text(rec.get("ground_truth"))
    if gt is None:
        return None, "missing or empty ground truth"
    source = rec.get("data_source")
    source = source if isinstance(source, str) and source else default_source
    return Row(messages, gt, source), ""


class _Skip(str):
    """A line of a JSONL file that is no record, and why (the reason of the skip warning)."""


def _records(path: Path, prompt_key: str) -> Iterator[Any]:
    """Raw records of one file; a JSON line that is not UTF-8 text or not JSON yields a `_Skip`
    (skipped and counted like a row without a prompt)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
        wanted = [prompt_key, "reward_model", "data_source", "answer", "ground_truth"]
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=65536, columns=columns):
            yield from batch.to_pylist()
    elif suffix in (".jsonl", ".json"):
        # Bytes, decoded line by line: one stray latin-1 line must cost that row only, as a
        # malformed JSON line does, not the whole file.
        with path.open("rb") as fh:
            for raw in fh:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield _Skip(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start}")
                    continue
                if not line.strip():
                    yield _Skip("bad JSON")
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield _Skip("bad JSON")
    else:
        raise DataError(f"{path}: unsupported data file type (use .parquet or .jsonl)")


def read_rows(path: str | Path, prompt_key: str = "prompt") -> tuple[list[Row], int]:
    """Valid rows of one file and how many were skipped (one warning names the first)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows: list[Row] = []
    skipped, first_bad = 0, None
    for i, rec in enumerate(_records(path, prompt_key)):
        row, why = (None, rec) if isinstance(rec, _Skip) else _parse_row(rec, prompt_key, path.stem)
        if row is None:
            skipped += 1
            first_bad = first_bad or (i, why)
        else:
            rows.append(row)
    if skipped:
        log.warning(
            "%s: skipped %d invalid row(s); first at row %d (%s)", path, skipped, *first_bad
        )
    if not rows:
        raise DataError(f"{path}: no valid rows ({skipped} skipped)")
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# The dataset


class PromptDataset:
    """All rows of some files, tokenized on demand, collated into left-padded PromptBatches."""

    def __init__(
        self,
        files: Sequence[str | Path],
        tokenizer,
        *,
        prompt_key: str = "prompt",
        max_prompt_length: int = 2048,
        pad_to_multiple: int = 64,
        apply_chat_template: bool = True,
    ):
        if isinstance(files, str | Path):
            files = [files]
        if not files:
            raise DataError("no data files given")
        self.rows: list[Row] = []
        self.skipped: dict[str, int] = {}
        for f in files:
            rows, skipped = read_rows(f, prompt_key)
            self.rows += rows
            self.skipped[str(f)] = skipped
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.pad_to_multiple = pad_to_multiple
        self.use_chat_template = apply_chat_template and bool(
            getattr(tokenizer, "chat_template", None)
        )
        self.pad_id = pad_id(tokenizer)

    @property
    def n_skipped(self) -> int:
        """Rows skipped as invalid, over all files."""
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.rows)

    def prompt_text(self, i: int) -> str:
        """Row i as the string the model sees (chat template with the generation prompt)."""
        messages = self.rows[i].messages
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages],
                add_generation_prompt=True,
                tokenize=False,
            )
        return "\n".join(c for _, c in messages)

    def encode(self, indices: Sequence[int]) -> list[list[int]]:
        """Token ids of the given rows, each left-truncated to its last max_prompt_length."""
        texts = [self.prompt_text(int(i)) for i in indices]
        if not texts:
            return []
        # The template already holds any BOS it wants; plain text gets the tokenizer's default.
        ids = self.tokenizer(texts, add_special_tokens=not self.use_chat_template)["input_ids"]
        return [list(x[-self.max_prompt_length :]) for x in ids]

    def padded_length(self, longest: int) -> int:
        """Batch width for a longest prompt of `longest` tokens: a multiple of pad_to_multiple, at
        least one, at most max_prompt_length rounded up."""
        m = self.pad_to_multiple
        cap = math.ceil(self.max_prompt_length / m) * m
        return min(max(math.ceil(longest / m) * m, m), cap)

    def collate(self, indices: Sequence[int]) -> PromptBatch:
        """The given rows as a PromptBatch, left-padded to the `padded_length` of the longest."""
        encoded = self.encode(indices)
        width = self.padded_length(max((len(e) for e in encoded), default=1))
        ids = np.full((len(encoded), width), self.pad_id, np.int32)  # [B, P]
        mask = np.zeros((len(encoded), width), np.int32)  # [B, P]
        for b, e in enumerate(encoded):
            if e:
                ids[b, width - len(e) :] = e
                mask[b, width - len(e) :] = 1
        rows = [self.rows[int(i)] for i in indices]
        return PromptBatch(
            input_ids=ids,
            attention_mask=mask,
            ground_truth=tuple(r.ground_truth for r in rows),
            data_source=tuple(r.data_source for r in rows),
            row_ids=tuple(int(i) for i in indices),
        )

    def iter_batches(self, batch_size: int) -> Iterator[PromptBatch]:
        """Every row once, in file order (for validation); the last batch may be smaller."""
        for start in range(0, len(self), batch_size):
            yield self.collate(range(start, min(start + batch_size, len(self))))


# ---------------------------------------------------------------------------------------------
# The training stream


class PromptStream:
    """An endless, resumable stream of training batches over epochs of a PromptDataset.

    Epoch e visits the rows in `epoch_order(e)`; a batch that reaches the end of an epoch is
    completed from the next one. `state` after any number of batches, given back to a new
    stream (same dataset, seed, shuffle), continues with exactly the same batches.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        seed: int,
        shuffle: bool = True,
        state: DataState | None = None,
    ):
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.state = state or DataState()
        bad = [i for i in self.state.requeue if not 0 <= i < len(dataset)]
        if not 0 <= self.state.index <= len(dataset) or bad:
            raise DataError(
                f"data position {self.state.index} is outside a dataset of {len(dataset)} rows "
                "(did the training files change since the checkpoint?)"
            )
        self._order_epoch, self._order = -1, np.arange(0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch`: a permutation seeded by (seed, epoch), or 0 .. n-1 without
        shuffle (the last one asked for is cached)."""
        if epoch != self._order_epoch:
            n = len(self.dataset)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self, batch_size: int) -> list[int]:
        """The next `batch_size` row indices of the stream (an epoch that ends is continued by the
        next); advances `state`."""
        epoch, index = self.state.epoch, self.state.index
        out: list[int] = list(self.state.requeue[:batch_size])
        requeue = self.state.requeue[len(out) :]
        while len(out) < batch_size:
            if index >= len(self.dataset):
                epoch, index = epoch + 1, 0
            take = min(batch_size - len(out), len(self.dataset) - index)
            out += self.epoch_order(epoch)[index : index + take].tolist()
            index += take
        if index >= len(self.dataset):  # an epoch just ended: say so in the saved position
            epoch, index = epoch + 1, 0
        self.state = DataState(epoch, index, requeue)
        return out

    def next_batch(self, batch_size: int) -> PromptBatch:
        """The next `batch_size` rows, collated; advances `state`."""
        return self.dataset.collate(self.next_indices(batch_size))


def _tokenizer_kwargs(data_cfg) -> dict[str, Any]:
    return {
        "prompt_key": data_cfg.prompt_key,
        "max_prompt_length": data_cfg.max_prompt_length,
        "pad_to_multiple": data_cfg.pad_to_multiple,
        "apply_chat_template": data_cfg.apply_chat_template,
    }


def train_stream(cfg, tokenizer, state: DataState | None = None) -> PromptStream:
    """The training stream of a Config (`data.train_files`, `trainer.seed`, `data.shuffle`)."""
    if not cfg.data.train_files:
        raise DataError("data.train_files is empty")
    ds = PromptDataset(cfg.data.train_files, tokenizer, **_tokenizer_kwargs(cfg.data))
    return PromptStream(ds, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle, state=state)


def val_dataset(cfg, tokenizer) -> PromptDataset | None:
    """The validation set of a Config, or None when `data.val_files` is empty."""
    if not cfg.data.val_files:
        return None
    return PromptDataset(cfg.data.val_files, tokenizer, **_tokenizer_kwargs(cfg.data))


__all__ = [
    "DataError",
    "DataState",
    "PromptBatch",
    "PromptDataset",
    "PromptStream",
    "Row",
    "pad_id",
    "read_rows",
    "train_stream",
    "val_dataset",
]
