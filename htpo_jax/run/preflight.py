"""Checks before anything loads: `LaunchError` (a problem the user can fix before anything
runs; `train.main` prints it as one line and exits 2), `check_model_dir` (a local
model/tokenizer directory lacks nothing; never a hub error), `prelaunch` (model, tokenizer and
data files of a config) and `setup_logging` (the trainer's log lines, Orbax's tracebacks cut)."""

from __future__ import annotations

import logging
import os
from pathlib import Path


class LaunchError(RuntimeError):
    """A launch problem described in one line (the user fixes the config, the files or the dir)."""


def is_url(path: str | os.PathLike) -> bool:
    """gs://, s3://, ...: remote paths are left as they are (no local resolution or locking)."""
    return "://" in str(path)


# ---------------------------------------------------------------- paths
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_dir(path: str, what: str = "model.path", tokenizer: bool = False) -> None:
    """A local HF directory with config.json and safetensors (or tokenizer files): one line
    naming what is missing. Nothing is ever downloaded, so a hub id is an error here too."""
    if not path:
        raise LaunchError(f"{what} is empty: set it to a local Hugging Face model directory")
    if is_url(path):
        return  # remote checkpoints are read by their own loaders
    p = Path(path)
    if not p.is_dir():
        raise LaunchError(f"{what}: {path} is not a directory (a local HF model dir is needed)")
    names = {f.name for f in p.iterdir()}
    if tokenizer:
        if not names & set(TOKENIZER_FILES):
            raise LaunchError(
                f"{what}: {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})"
            )
        return
    if "config.json" not in names:
        raise LaunchError(f"{what}: {path} has no config.json")
    if not any(n.endswith(".safetensors") for n in names):
        raise LaunchError(f"{what}: {path} has no *.safetensors weights")


# ---------------------------------------------------------------- the trainer's calls
def setup_logging(level: int = logging.INFO) -> None:
    """Show htpo_jax's INFO lines ("resumed from step N", ...). Importing orbax installs absl's
    handler on the root logger, which turns `logging.basicConfig` into a no-op and leaves the
    root at WARNING, so INFO records of ours were never created. Setting the package logger's
    level is enough: its records propagate to whatever handler the root has."""
    logging.getLogger("htpo_jax").setLevel(level)
    absl = logging.getLogger("absl")
    if _drop_traceback not in absl.filters:
        absl.addFilter(_drop_traceback)


def _drop_traceback(record: logging.LogRecord) -> bool:
    """Orbax logs a failed background save with its traceback on every thread involved (~1,500
    lines for a full disk); the trainer reports it in one line, so absl's records keep only their
    message line."""
    if record.exc_info or record.exc_text:
        record.exc_info, record.exc_text = None, None
    return True


def prelaunch(cfg) -> None:
    """Checks that need no model load: model and tokenizer directories (data files are read
    right after, still before the model loads)."""
    check_model_dir(cfg.model.path, "model.path")
    tok = cfg.model.tokenizer_path or cfg.model.path
    check_model_dir(
        tok, "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path", tokenizer=True
    )
    for f in (*cfg.data.train_files, *cfg.data.val_files):
        if not is_url(f) and not Path(f).is_file():
            key = "data.train_files" if f in cfg.data.train_files else "data.val_files"
            raise LaunchError(f"{key}: data file not found: {f}")
