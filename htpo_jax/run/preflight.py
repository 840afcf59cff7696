"""Checks before anything loads: `LaunchError` (a problem the user can fix before anything
runs; `train.main` prints it as one line and exits 2), `check_model_dir` (a local
model/tokenizer directory lacks nothing and holds a model the decoder runs; never a hub error),
`check_writable_dir` (a run directory can be created and written, checked without writing
anything that stays), `prelaunch` (model, tokenizer, data files and run directories of a
config) and `setup_logging` (the trainer's log lines, Orbax's tracebacks cut)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
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
    check_model_config(p / "config.json", what)


def check_model_config(config_json: Path, what: str = "model.path") -> None:
    """config.json describes a model `models.decoder` runs (family, activation, rope): a gpt2
    or yarn-scaled model is one line here, not a traceback once the weights are being read."""
    from htpo_jax.models.model_config import ModelConfig  # light: no JAX arrays are made

    where = f"{what}: {config_json.parent}"
    try:
        hf = json.loads(config_json.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        line = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise LaunchError(f"{where}: config.json is not valid JSON{line}") from None
    except OSError as e:
        raise LaunchError(f"{where}: config.json cannot be read ({e.strerror or e})") from None
    if not isinstance(hf, dict):
        raise LaunchError(f"{where}: config.json is not a JSON object")
    try:
        ModelConfig.from_hf_dict(hf)
    except KeyError as e:
        raise LaunchError(f"{where}: config.json lacks {e}") from None
    except (ValueError, TypeError) as e:
        raise LaunchError(f"{where}: {e}") from None


def check_writable_dir(path: str, what: str) -> None:
    """A local run directory that exists and can be written, or that can be created: its
    nearest existing ancestor is a writable directory. Probed with a temporary file, removed at
    once (permission bits say nothing for root or on a read-only mount). URLs are skipped."""
    if not path or is_url(path):
        return
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        if probe == p:
            raise LaunchError(f"{what}: {path} is a file, not a directory")
        raise LaunchError(f"{what}: cannot create {path}: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".htpo_write_check_", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        inside = "" if probe == p else f" (it would be created inside {probe})"
        raise LaunchError(f"{what}: cannot write to {path}{inside}: {e.strerror or e}") from None


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


def prelaunch(cfg, main_process: bool = True) -> None:
    """Checks that need no model load: model and tokenizer directories, data files, and that
    the output and checkpoint directories can be written (the output dir only on the main
    process, the one that writes there; data files are read right after, still before the model
    loads)."""
    check_model_dir(cfg.model.path, "model.path")
    tok = cfg.model.tokenizer_path or cfg.model.path
    check_model_dir(
        tok, "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path", tokenizer=True
    )
    for f in (*cfg.data.train_files, *cfg.data.val_files):
        if not is_url(f) and not Path(f).is_file():
            key = "data.train_files" if f in cfg.data.train_files else "data.val_files"
            raise LaunchError(f"{key}: data file not found: {f}")
    if main_process:
        check_writable_dir(cfg.trainer.output_dir, "trainer.output_dir")
        # asked for explicitly, so a missing package stops the run (tensorboard only warns,
        # as it always has)
        if "wandb" in cfg.trainer.loggers and importlib.util.find_spec("wandb") is None:
            raise LaunchError(
                "trainer.loggers has 'wandb' but the wandb package is not installed "
                "(pip install -e '.[wandb]')"
            )
    check_writable_dir(cfg.checkpoint_dir, checkpoint_key(cfg))


def checkpoint_key(cfg) -> str:
    """The config key that names the run's checkpoint directory, for messages."""
    return "checkpoint.dir" if cfg.checkpoint.dir else "checkpoint.dir (<output_dir>/checkpoints)"
