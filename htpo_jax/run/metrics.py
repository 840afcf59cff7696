"""Stage 8 logging: `metrics.jsonl` (one JSON object per line, each with `step`), always; the
optional sinks of `trainer.loggers`: TensorBoard event files (`tensorboardX`) and a Weights &
Biases run (`wandb`), each fed the same records; and a few helpers to turn arrays into plain
floats. Only process 0 writes anything."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import uuid
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


@dataclasses.dataclass(frozen=True)
class WandbOptions:
    """What the W&B run is called and holds. `run_id` is the trainer's run id, saved in every
    checkpoint's `extra`: a resumed run passes the same id, so it continues the same W&B run.
    `config` is the resolved run config (a plain nested dict)."""

    project: str
    name: str
    run_id: str
    tags: tuple[str, ...] = ()
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


class MetricsLogger:
    """Appends to `<output_dir>/metrics.jsonl`; on resume, drops lines of steps after the
    checkpoint (they will be recomputed), so the file never holds a step twice. `loggers` may
    add `tensorboard` (event files in `<output_dir>/tensorboard`) and `wandb` (needs `wandb`:
    a run in `<output_dir>/wandb`, resumed by id)."""

    def __init__(
        self,
        output_dir: str | Path,
        resume_step: int | None = None,
        loggers: tuple[str, ...] = ("jsonl",),
        wandb: WandbOptions | None = None,
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb_run = None
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
        if "tensorboard" in loggers:
            self.tb = _tensorboard_writer(Path(output_dir) / "tensorboard")
        if "wandb" in loggers:
            if wandb is None:
                raise ValueError("trainer.loggers has 'wandb': pass WandbOptions")
            self.wandb_run = _wandb_run(Path(output_dir), wandb)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One record: a line of metrics.jsonl, and the same values (NaN left out) at `step` in
        TensorBoard and W&B."""
        if not self.enabled:
            return
        record = {"step": int(step), **plain(metrics)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = {k: v for k, v in record.items() if k != "step" and v is not None}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=int(step))

    def close(self) -> None:
        """Flush and close the optional sinks (metrics.jsonl is closed after every line)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _tensorboard_writer(directory: Path):
    """A tensorboardX writer, or None with a warning when tensorboardX is missing (a run
    without its extra still trains and writes metrics.jsonl)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log.warning(
            "trainer.loggers has 'tensorboard' but tensorboardX is not installed "
            "(pip install -e '.[tensorboard]'); logging to metrics.jsonl only"
        )
        return None
    # a unique suffix: the file name's time is in whole seconds, and a second writer in the
    # same second (a quick resume) would truncate the first one's file
    return SummaryWriter(str(directory), filename_suffix=f".{uuid.uuid4().hex[:8]}")


def _wandb_run(output_dir: Path, opts: WandbOptions):
    """The W&B run of this training run: created, or continued when a run with `opts.run_id`
    exists (resume="allow"). Its files go to `<output_dir>/wandb`; WANDB_MODE=offline keeps
    them there for a later `wandb sync`. The trainer checked at launch that wandb imports."""
    import wandb

    return wandb.init(
        project=opts.project,
        name=opts.name,
        id=opts.run_id,
        resume="allow",
        tags=list(opts.tags),
        config=opts.config,
        dir=str(output_dir),
    )


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
