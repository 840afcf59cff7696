"""Stage 8 logging: `metrics.jsonl` (one JSON object per line, each with `step`), optional
TensorBoard event files, and a few helpers to turn arrays into plain floats."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from htpo_jax.infra.sharding import is_main_process

log = logging.getLogger(__name__)


def to_float(x) -> float:
    """An array or scalar as a Python float."""
    return float(np.asarray(x))


def plain(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars only, as Python floats (arrays -> float; NaN kept as None for JSON)."""
    out = {}
    for k, v in metrics.items():
        f = to_float(v)
        out[k] = None if math.isnan(f) else f
    return out


class MetricsLogger:
    """Appends to `<output_dir>/metrics.jsonl`; on resume, drops lines of steps after the
    checkpoint (they will be recomputed), so the file never holds a step twice."""

    def __init__(
        self, output_dir: str | Path, resume_step: int | None = None, tensorboard: bool = False
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.enabled = is_main_process()  # one writer on a multi-host run
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line
                for line in _valid_lines(self.path)
                if json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning(
                    "trainer.logger has 'tensorboard' but tensorboardX is not installed "
                    "(pip install -e '.[tensorboard]'); logging to metrics.jsonl only"
                )
            else:
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Appends one {"step", **metrics} line to metrics.jsonl (and the scalars to TensorBoard);
        does nothing on processes other than 0."""
        if not self.enabled:
            return
        record = {"step": int(step), **plain(metrics)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        """Closes the TensorBoard writer, if any."""
        if self.tb is not None:
            self.tb.close()


def _valid_lines(path: Path) -> list[str]:
    """Non-empty lines that parse as JSON objects. A crash (or a full disk) mid-write leaves a
    truncated last line: it is dropped with a warning naming the file. A bad line elsewhere means
    the file is not ours to fix: one line naming the file and line number."""
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    out = []
    for n, (i, line) in enumerate(lines):
        try:
            ok = isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            ok = False
        if ok:
            out.append(line)
        elif n == len(lines) - 1:
            log.warning("%s: dropping the truncated last line %d (%r)", path, i, line[:60])
        else:
            raise ValueError(f"{path}: line {i} is not a JSON object: {line[:60]!r}")
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a truncated last line is dropped with a warning)."""
    return [json.loads(line) for line in _valid_lines(Path(path))]
