"""The run configuration: one tree of frozen dataclasses, loaded from YAML plus `--set` overrides.

Sections: model, data, rollout, algorithm, optim, trainer, checkpoint, mesh, distributed.
Defaults are the paper's (its train.sh: Qwen3-8B-Base on DAPO-Math-17k). Everything is validated
before any work starts; a bad value or unknown key raises `ConfigError` with one line that names
the key and the allowed values or the nearest known key. `cli_config` turns that into a message
and exit status 2.

The config is never mutated at run time; derive a changed copy with `dataclasses.replace`.
`docs/CONFIG.md` is generated from the field help below (`python -m htpo_jax.config --markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from htpo_jax.loss import AGG_MODES, LOSS_BOUNDS


class ConfigError(ValueError):
    """A config problem, described in one line that names the key."""


def _f(default, help: str, check=None):
    """A field with its help text (for docs/CONFIG.md) and an optional (predicate, message)."""
    meta = {"help": help, "check": check}
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults (frozen config)")
    return field(default=default, metadata=meta)


POS = (lambda v: v > 0, "must be > 0")
NONNEG = (lambda v: v >= 0, "must be >= 0")
UNIT = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
OPEN_UNIT = (lambda v: 0 < v < 1, "must be in (0, 1)")
TOP_P = (lambda v: 0 < v <= 1, "must be in (0, 1]")
TOP_K = (lambda v: v == -1 or v > 0, "must be -1 (off) or > 0")
MESH = (lambda v: v == -1 or v >= 1, "must be -1 (the rest) or >= 1")
# The loss's hyperparameters: loss.LOSS_BOUNDS, the entries LossConfig itself checks (one
# validator per key, so a value accepted here never fails later in the loss).
CLIP_LOW, CLIP_HIGH, CLIP_C, SHARE = (
    LOSS_BOUNDS[k]
    for k in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "high_entropy_ratio")
)

LossName = Literal["htpo", "dapo", "grpo", "dr_grpo", "high_entropy_only"]
AggMode = Literal[AGG_MODES]  # the loss's own list


@dataclass(frozen=True)
class ModelSection:
    """The `model:` section (models.ModelConfig is the architecture, read from config.json)."""

    path: str = _f("", "HF model directory (config.json, *.safetensors, tokenizer files).")
    tokenizer_path: str = _f("", "Tokenizer directory; empty = model.path.")
    dtype: Literal["bfloat16", "float32"] = _f("bfloat16", "Activation / compute dtype.")
    param_dtype: Literal["float32", "bfloat16"] = _f("float32", "Dtype of stored parameters.")
    remat: bool = _f(True, "Rematerialize decoder layers in the backward pass (less memory).")
    attention_chunk_size: int = _f(
        0,
        "Query block of the chunked attention (0 = 2,048; attention_impl=auto picks chunked on "
        "CPU only above that length).",
        NONNEG,
    )
    attention_impl: Literal["auto", "xla", "chunked", "splash", "cudnn"] = _f(
        "auto",
        "Training/scoring attention: xla (full T x T scores), chunked (attention_chunk_size "
        "queries at a time), splash (Pallas TPU flash kernel), cudnn (GPU flash, bf16/fp16); "
        "auto = splash on TPU, cudnn on GPU, else chunked above 2,048 positions, else xla.",
    )
    scan_layers: bool = _f(
        True,
        "Stack the layers' parameters [L, ...] and apply them with lax.scan: compile time and "
        "program size do not grow with depth (false: a Python loop; same results, but "
        "checkpoints of one layout do not restore into the other).",
    )


@dataclass(frozen=True)
class DataConfig:
    train_files: tuple[str, ...] = _f((), "Training files (.parquet or .jsonl).")
    val_files: tuple[str, ...] = _f((), "Validation files (.parquet or .jsonl).")
    prompt_key: str = _f("prompt", "Column holding the chat messages (or a plain prompt string).")
    max_prompt_length: int = _f(
        2048, "Prompt tokens kept; longer prompts keep their last tokens.", POS
    )
    pad_to_multiple: int = _f(
        64, "Prompt batches are padded to a multiple of this (few shapes).", POS
    )
    apply_chat_template: bool = _f(True, "Wrap prompts in the tokenizer's chat template.")
    shuffle: bool = _f(True, "Shuffle the training set each epoch (seeded by trainer.seed).")
    train_batch_size: int = _f(128, "Prompts per RL step (after dynamic-sampling filtering).", POS)
    gen_batch_size: int = _f(256, "Prompts drawn per generation round.", POS)
    val_batch_size: int = _f(256, "Prompts per validation generation round.", POS)
    balance_batch: bool = _f(
        True,
        "Reorder each step's rows so every data-parallel shard gets a balanced total "
        "sequence length (verl's trainer.balance_batch).",
    )


@dataclass(frozen=True)
class RolloutConfig:
    n: int = _f(16, "Responses sampled per prompt (the GRPO group size G).", POS)
    max_num_seqs: int = _f(
        0,
        "Most responses decoding at once (engine slots, split over the batch shards; static: "
        "per sampler call); 0 = min(responses, 512) per engine, all for static.",
        NONNEG,
    )
    engine: Literal["paged", "static"] = _f(
        "paged", "Sampler: continuous batching over a paged KV cache, or the dense reference."
    )
    page_size: int = _f(16, "KV-cache page size in tokens (engine).", POS)
    num_pages: int = _f(
        0, "KV-cache pages in the pool (engine; 0 = from kv_memory_fraction).", NONNEG
    )
    kv_memory_fraction: float = _f(
        0.5,
        "Share of free device memory (host RAM on CPU) for the page pool when num_pages = 0.",
        OPEN_UNIT,
    )
    steps_per_call: int = _f(16, "Decode steps per host round-trip of the engine.", POS)
    work_stealing: bool = _f(
        True, "Engine batch shards take waiting responses from each other (docs/ROLLOUT.md)."
    )
    max_response_length: int = _f(20480, "Maximum new tokens per response.", POS)
    temperature: float = _f(1.0, "Sampling temperature for training rollouts.", POS)
    top_p: float = _f(1.0, "Nucleus sampling for training rollouts (1.0 = off).", TOP_P)
    top_k: int = _f(-1, "Top-k sampling for training rollouts (-1 = off).", TOP_K)
    val_n: int = _f(
        1,
        "Responses per validation prompt (paper: 1; its AIME file repeats each problem 32x).",
        POS,
    )
    val_temperature: float = _f(1.0, "Validation sampling temperature (0 = greedy).", NONNEG)
    val_top_p: float = _f(0.7, "Validation nucleus sampling.", TOP_P)
    val_top_k: int = _f(-1, "Validation top-k (-1 = off).", TOP_K)


@dataclass(frozen=True)
class AlgorithmConfig:
    loss: LossName = _f("htpo", "Policy loss: HTPO or a baseline.")
    loss_agg_mode: AggMode = _f("token-mean", "How token losses are averaged (verl's agg_loss).")
    # The loss's keys are checked by the loss's own bounds (LossConfig uses the same entries).
    clip_ratio_low: float = _f(0.2, "PPO lower clip eps_l: ratio floor 1 - eps_l.", CLIP_LOW)
    clip_ratio_high: float = _f(
        0.28, "PPO upper clip eps_h (clip-higher): ratio cap 1 + eps_h.", CLIP_HIGH
    )
    clip_ratio_c: float = _f(10.0, "Dual-clip constant c for negative advantages.", CLIP_C)
    difficulty_threshold: float = _f(0.6, "Prompt is hard iff group accuracy < this.", UNIT)
    high_entropy_ratio: float = _f(
        0.2, "Fraction of each response's tokens called high-entropy.", SHARE
    )
    drop_low_entropy_ratio: float = _f(0.006, "Hard&correct: drop this share of low tokens.", SHARE)
    drop_high_entropy_ratio: float = _f(
        0.02, "Easy&correct: drop this share of high tokens.", SHARE
    )
    dynamic_sampling: bool = _f(True, "Drop prompt groups with zero reward std; draw more.")
    dynamic_sampling_metric: Literal["acc", "score"] = _f("acc", "Quantity whose std must be > 0.")
    max_num_gen_batches: int = _f(
        10, "Generation rounds per step before giving up (0 = no cap).", NONNEG
    )
    overlong_buffer_enable: bool = _f(True, "Add the DAPO soft overlong penalty to rewards.")
    overlong_buffer_len: int = _f(4096, "Tokens before max_response_length where it starts.", POS)
    overlong_penalty_factor: float = _f(1.0, "Penalty at max_response_length.", NONNEG)
    use_kl_loss: bool = _f(False, "Add a KL term to the reference (initial) policy to the loss.")
    kl_coef: float = _f(0.001, "Weight of the KL term.", NONNEG)
    kl_loss_type: Literal["low_var_kl", "kl", "mse", "abs"] = _f("low_var_kl", "KL estimator.")
    reward_fn: Literal["dapo_math", "math_verify"] = _f(
        "dapo_math", "Verifier when reward_routing=reward_fn (and of the reward worker pool)."
    )
    reward_routing: Literal["data_source", "reward_fn"] = _f(
        "data_source",
        "data_source: each row's verifier by its data_source, as verl (unknown source = "
        "error); reward_fn: algorithm.reward_fn for every row.",
    )
    reward_timeout_s: float = _f(10.0, "Per-response scoring time limit (0 = none).", NONNEG)
    reward_num_workers: int = _f(0, "Scoring processes (0 = in the main process).", NONNEG)


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = _f(1e-6, "Peak AdamW learning rate.", POS)
    warmup_steps: int = _f(
        10, "Linear warmup from 0, in RL steps (every update of a step uses its lr).", NONNEG
    )
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "Schedule after warmup.")
    min_lr_ratio: float = _f(0.0, "Cosine schedule floor, as a fraction of the peak.", UNIT)
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay.", NONNEG)
    b1: float = _f(0.9, "AdamW beta1.", OPEN_UNIT)
    b2: float = _f(0.999, "AdamW beta2.", OPEN_UNIT)
    eps: float = _f(1e-8, "AdamW epsilon.", POS)
    grad_clip: float = _f(1.0, "Global gradient-norm clip (0 = off).", NONNEG)
    mini_batch_size: int = _f(32, "Prompts per optimizer update (PPO mini-batch).", POS)
    micro_batch_size: int = _f(16, "Responses per gradient-accumulation chunk.", POS)
    max_tokens_per_micro: int = _f(
        0,
        "Token budget per batch shard (chip) of a scoring / update micro-batch: rows sorted by "
        "length, each micro-batch padded to its own length bucket (0 = off: micro_batch_size "
        "rows padded to the step's longest response).",
        NONNEG,
    )
    ppo_epochs: int = _f(1, "Passes over each step's batch.", POS)


@dataclass(frozen=True)
class TrainerConfig:
    output_dir: str = _f("runs/htpo", "Run directory: logs, checkpoints, resolved config.")
    total_steps: int = _f(1000, "RL steps to run.", POS)
    seed: int = _f(1, "Seed for data order, sampling and initialization.", NONNEG)
    val_every: int = _f(10, "Validate every k steps (0 = only at start and end).", NONNEG)
    val_before_train: bool = _f(True, "Validate at step 0, before any update.")
    val_only: bool = _f(False, "Validate the (latest checkpoint's) policy once and exit.")
    log_every: int = _f(1, "Write metrics every k steps.", POS)
    logger: tuple[Literal["jsonl", "tensorboard"], ...] = _f(("jsonl",), "Metric sinks.")
    progress_bar: bool = _f(True, "Show a tqdm progress bar.")
    max_nonfinite_steps: int = _f(
        3, "Stop after this many RL steps in a row with a non-finite update (0 = never).", NONNEG
    )
    collapse_window: int = _f(
        10, "Warn when train/accuracy is 0 this many steps in a row (0 = off).", NONNEG
    )
    collective_timeout_s: float = _f(
        900.0,
        "Multi-host: longest wait of one host for the others at a sync point before the run "
        "stops with an error naming the stage (the watchdog).",
        POS,
    )


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = _f(10, "Save every k steps, and at the end (0 = only at the end).", NONNEG)
    max_to_keep: int = _f(3, "Checkpoints kept (oldest deleted).", POS)
    dir: str = _f("", "Checkpoint directory; empty = <trainer.output_dir>/checkpoints.")
    resume: bool = _f(True, "Resume from the latest checkpoint in dir if there is one.")
    allow_config_change: bool = _f(
        False, "Resume even when keys that change results differ from the checkpoint's config."
    )


@dataclass(frozen=True)
class MeshConfig:
    data: int = _f(1, "Data-parallel axis size (-1 = the rest of the devices).", MESH)
    fsdp: int = _f(-1, "Parameter-sharding axis size (-1 = the rest).", MESH)
    tensor: int = _f(1, "Tensor-parallel axis size (-1 = the rest).", MESH)


@dataclass(frozen=True)
class DistributedConfig:
    initialize: Literal["auto", "always", "never"] = _f(
        "auto",
        "Call jax.distributed.initialize: auto = when coordinator/num_processes, "
        "HTPO_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS, or a SLURM/Open MPI job of several tasks "
        "says there are several processes.",
    )
    coordinator: str = _f(
        "", "HOST:PORT of process 0's coordination service; empty = environment / auto-detect."
    )
    num_processes: int = _f(0, "Number of processes (0 = environment / auto-detect).", NONNEG)
    process_id: int = _f(
        -1,
        "This process's index, 0 .. num_processes-1 (-1 = environment / auto-detect).",
        (lambda v: v >= -1, "must be -1 (auto) or >= 0"),
    )
    local_device_ids: tuple[int, ...] = _f(
        (), "GPU ids this process uses (one process per GPU); empty = all it sees."
    )
    init_timeout_s: int = _f(300, "Seconds to wait for every process to join at start.", POS)


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists): for logging, JSON and YAML."""
        return _plain(dataclasses.asdict(self))

    @property
    def checkpoint_dir(self) -> str:
        if self.checkpoint.dir:
            return self.checkpoint.dir
        if "://" in self.trainer.output_dir:  # Path() would fold 'gs://' into 'gs:/'
            return self.trainer.output_dir.rstrip("/") + "/checkpoints"
        return str(Path(self.trainer.output_dir) / "checkpoints")


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _fields(cls)]


def _initials(name: str) -> str:
    return "".join(part[:1] for part in name.split("_"))


def _nearest(key: str) -> str | None:
    """The known key a typo most likely meant: same section first, then anywhere."""
    keys = all_keys()
    section, _, leaf = key.rpartition(".")
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # right name, wrong section
    if same_leaf:
        return same_leaf[0]
    if section in SECTIONS:
        leaves = list(_fields(SECTIONS[section]))
        # abbreviations first ('lr' -> learning_rate, 'rematerialize' -> remat), then spelling
        near = [
            k
            for k in leaves
            if leaf and (_initials(k) == leaf or k.startswith(leaf) or leaf.startswith(k))
        ]
        near = near or difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
        if near:
            return f"{section}.{near[0]}"
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if near:
        return near[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[near[0]] if near else None


def _unknown(key: str) -> ConfigError:
    near = _nearest(key)
    hint = f" (did you mean '{near}'?)" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check / convert one YAML value to the field's type; raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):  # `--set data.train_files=a.parquet` means a list of one
            value = [value]
        if value is None:
            value = []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(key, v, item_tp) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads '1e-6' (no dot) as a string; accept any number spelling.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf / .nan pass every range check below
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{key}: unsupported field type {_type_name(tp)}")


def config_from_dict(tree: dict | None) -> Config:
    """Build and validate a Config from a nested dict (missing keys take their defaults)."""
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(tree).__name__}")
    sections = {}
    for name, body in tree.items():
        if name not in SECTIONS:
            near = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config section '{name}'{hint}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {body!r}")
    for name, cls in SECTIONS.items():
        body = tree.get(name) or {}
        known = _fields(cls)
        kwargs = {}
        for k, v in body.items():
            key = f"{name}.{k}"
            if k not in known:
                raise _unknown(key)
            f, tp = known[k]
            v = _coerce(key, v, tp)
            check = f.metadata.get("check")
            if check is not None and not check[0](v):
                raise ConfigError(f"{key}: {check[1]}, got {v!r}")
            kwargs[k] = v
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    _cross_checks(cfg)
    return cfg


def _cross_checks(c: Config) -> None:
    def bad(key, msg):
        raise ConfigError(f"{key}: {msg}")

    if c.data.train_batch_size % c.optim.mini_batch_size:
        bad(
            "optim.mini_batch_size",
            f"must divide data.train_batch_size ({c.data.train_batch_size}), "
            f"got {c.optim.mini_batch_size}",
        )
    responses = c.optim.mini_batch_size * c.rollout.n
    if responses % c.optim.micro_batch_size:
        bad(
            "optim.micro_batch_size",
            f"must divide optim.mini_batch_size * rollout.n ({responses}), "
            f"got {c.optim.micro_batch_size}",
        )
    if c.algorithm.overlong_buffer_enable and (
        c.algorithm.overlong_buffer_len >= c.rollout.max_response_length
    ):
        bad(
            "algorithm.overlong_buffer_len",
            f"must be < rollout.max_response_length ({c.rollout.max_response_length}), "
            f"got {c.algorithm.overlong_buffer_len}",
        )
    if c.optim.warmup_steps > c.trainer.total_steps:
        bad("optim.warmup_steps", f"must be <= trainer.total_steps ({c.trainer.total_steps})")
    mesh = dataclasses.asdict(c.mesh)
    if sum(v == -1 for v in mesh.values()) > 1:
        bad("mesh", f"at most one axis may be -1, got {mesh}")
    if not c.trainer.output_dir.strip():
        bad("trainer.output_dir", "must not be empty")
    if len(set(c.trainer.logger)) != len(c.trainer.logger):
        bad("trainer.logger", f"duplicate entries in {list(c.trainer.logger)}")
    _check_storage_urls(c, bad)


def _check_storage_urls(c: Config, bad) -> None:
    """gs:// is the one URL scheme for checkpoints; logs stay on local disk (appended per step)."""
    if "://" in c.trainer.output_dir:
        bad(
            "trainer.output_dir",
            f"must be a local directory (metrics.jsonl is appended every step), got "
            f"{c.trainer.output_dir!r}; put checkpoints on Cloud Storage with "
            f"checkpoint.dir=gs://BUCKET/PATH",
        )
    if "://" in c.checkpoint.dir and not c.checkpoint.dir.startswith("gs://"):
        bad("checkpoint.dir", f"only gs:// URLs or local paths, got {c.checkpoint.dir!r}")
    # a mistyped URL such as gs:/b, possibly made absolute by the path resolution above
    if "gs:/" in c.checkpoint.dir and "gs://" not in c.checkpoint.dir:
        bad("checkpoint.dir", f"a Cloud Storage URL is gs://BUCKET/PATH, got {c.checkpoint.dir!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', c parsed as a YAML scalar / flow value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unparsable value is taken literally; its field then judges it
    return key, value


def _apply(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in SECTIONS and isinstance(value, dict):
        tree.setdefault(parts[0], {}).update(value)
        return
    if len(parts) != 2:
        raise _unknown(key)
    section, leaf = parts
    if section not in SECTIONS or leaf not in _fields(SECTIONS[section]):
        raise _unknown(key)
    body = tree.setdefault(section, {})
    if body is None:
        body = tree[section] = {}
    body[leaf] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (if any, on top of its `base:` chain), then `a.b=c` overrides
    in order; validated."""
    tree: dict = {}
    if path is not None:
        tree = _read_config_file(Path(path), ())  # validated: file problems before overrides
    for text in overrides:
        _apply(tree, *parse_override(text))
    _resolve_paths(tree, Path.cwd())  # paths from --set: relative to where the user is
    if not isinstance(tree.get("trainer"), dict) or "output_dir" not in tree["trainer"]:
        default = TrainerConfig.output_dir  # the one path with a default: where the user is too
        tree["trainer"] = {**(tree.get("trainer") or {}), "output_dir": str(Path.cwd() / default)}
    return config_from_dict(tree)


def _read_config_file(p: Path, chain: tuple[Path, ...]) -> dict:
    """One YAML file as a tree of sections, its relative paths made absolute against its own
    directory, merged key by key over its `base:` file (itself read the same way). `chain` holds
    the files that include this one, to stop a cycle."""
    if not p.is_file():
        if chain:
            raise ConfigError(f"{chain[-1]}: base file not found: {p}")
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in chain:
        cycle = " -> ".join(str(c) for c in (*chain, p.resolve()))
        raise ConfigError(f"{chain[-1]}: base files form a cycle: {cycle}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} is not valid YAML") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    base = tree.pop("base", None)
    _resolve_paths(tree, p.resolve().parent)
    if base is not None:
        tree = _merge_base(p, base, tree, chain)
    try:
        config_from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return tree


def _merge_base(p: Path, base, tree: dict, chain: tuple[Path, ...]) -> dict:
    """`tree` (file `p`, whose `base:` key was `base`) merged over its base file's tree."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: base: expected a YAML file name, got {base!r}")
    under = _read_config_file(p.resolve().parent / os.path.expanduser(base), (*chain, p.resolve()))
    for name, body in tree.items():  # sections merge key by key; this file's values win
        if isinstance(body, dict) and isinstance(under.get(name), dict):
            body = {**under[name], **body}
        elif body is None and name in under:
            continue
        under[name] = body
    return under


# Keys that name files or directories. Relative values resolve against the config file's
# directory (or the working directory for --set), so a run and its saved config.yaml work from
# anywhere. URLs (gs://, s3://, ...) and empty values are left as they are.
PATH_KEYS = (
    "model.path",
    "model.tokenizer_path",
    "data.train_files",
    "data.val_files",
    "trainer.output_dir",
    "checkpoint.dir",
)


def _abs_path(value, base: Path):
    if not isinstance(value, str) or not value or "://" in value:
        return value
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def _resolve_paths(tree: dict, base: Path) -> None:
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        body = tree.get(section)
        if not isinstance(body, dict) or leaf not in body:
            continue
        v = body[leaf]
        if isinstance(v, list | tuple):
            body[leaf] = [_abs_path(x, base) for x in v]
        else:
            body[leaf] = _abs_path(v, base)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override keys, e.g. --set optim.learning_rate=1e-6 trainer.total_steps=5",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """load_config from parsed `add_config_args` arguments; on ConfigError print and exit 2."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_config(argv: typing.Sequence[str] | None = None, description: str | None = None) -> Config:
    """Parse `--config PATH --set k=v ...` from argv; a bad config exits 2 with one line."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _doc_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_doc_type(typing.get_args(tp)[0])}"
    if isinstance(tp, types.GenericAlias):
        return str(tp)
    return tp.__name__


def config_markdown() -> str:
    """docs/CONFIG.md: every key, its type, default and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m htpo_jax.config --markdown > docs/CONFIG.md`; do not edit.",
        "",
        "Set keys in a YAML file (`--config run.yaml`, sections as top-level mappings) or on the",
        "command line (`--set section.key=value`, the value read as YAML). Defaults are the",
        "paper's (train.sh of the official implementation: Qwen3-8B-Base on DAPO-Math-17k).",
        "Unknown keys and bad values stop the run before any work, naming the key.",
        "",
        "A file can start from another: `base: other.yaml` (relative to the including file; the",
        "base must be a valid config itself) takes every key of `other.yaml`, then this file's",
        "keys replace the base's one by one (a section is merged, not replaced). Relative paths",
        "resolve against the directory of the file that wrote them. `configs/dapo_baseline.yaml`",
        "is the paper run with `base:` and three keys.",
        "",
    ]
    for name, cls in SECTIONS.items():
        lines += [f"## `{name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for k, (f, tp) in _fields(cls).items():
            default = yaml.safe_dump(_plain(f.default), default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            help_text = f.metadata["help"]
            if f.metadata.get("check"):
                help_text += f" ({f.metadata['check'][1].replace('must be ', '')})"
            lines.append(f"| `{name}.{k}` | {_doc_type(tp)} | `{default}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: typing.Sequence[str] | None = None) -> None:
    """Print the resolved config as YAML (or the markdown reference with --markdown)."""
    parser = argparse.ArgumentParser(description="Validate a config and print it resolved.")
    add_config_args(parser)
    parser.add_argument("--markdown", action="store_true", help="print docs/CONFIG.md")
    args = parser.parse_args(argv)
    if args.markdown:
        print(config_markdown(), end="")
        return
    print(dump_yaml(config_from_args(args)), end="")


if __name__ == "__main__":
    main()
