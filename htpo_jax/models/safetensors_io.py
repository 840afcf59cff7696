"""Minimal safetensors reading and writing on numpy, lazily and without torch.

Reading memory-maps each file and hands out zero-copy numpy views, so a caller that copies only
one shard of a tensor (see `hf_io.from_pretrained` with a mesh) never holds the whole tensor.
Writing streams tensors one at a time, so a caller can fetch each from devices as it is written.
bfloat16 is `ml_dtypes.bfloat16` (a jax dependency).

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_header(filename: str) -> tuple[int, dict]:
    """(byte offset of the tensor data, header without `__metadata__`) of one safetensors file."""
    with open(filename, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class LazyCheckpoint:
    """name -> numpy view (memory-mapped) over a single- or multi-file safetensors checkpoint."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
        self._entries: dict[str, tuple[str, int, dict]] = {}
        for name in files:
            filename = os.path.join(path, name)
            start, header = read_header(filename)
            for key, info in header.items():
                self._entries[key] = (filename, start, info)
        self._maps: dict[str, np.memmap] = {}

    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint, over all its files."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> np.ndarray:
        filename, start, info = self._entries[name]
        if filename not in self._maps:
            self._maps[filename] = np.memmap(filename, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        raw = self._maps[filename][start + begin : start + end]
        return raw.view(dtype).reshape(info["shape"])


def write_checkpoint(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    fetch: Callable[[str], np.ndarray],
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes tensors (name, shape, dtype) in order, calling `fetch(name)` for each one's data.

    One file `model.safetensors` when everything fits in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. Returns the files.
    """
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    total = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), np.dtype(dtype)))
        size += nbytes
        total += nbytes
    n = len(shards)
    names = (
        [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map = {}
    for filename, shard in zip(names, shards, strict=True):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in shard:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = filename
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned
        with open(os.path.join(path, filename), "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in shard:
                arr = np.ascontiguousarray(np.asarray(fetch(name)).astype(dtype))
                if arr.shape != shape:
                    raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
                f.write(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    if n > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
