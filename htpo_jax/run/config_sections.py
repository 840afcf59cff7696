"""The run configuration's schema: one frozen dataclass per section, every field with its
default (the paper's: its train.sh, Qwen3-8B-Base on DAPO-Math-17k), its help text (the source of
docs/CONFIG.md) and an optional (predicate, message) check. Loading, validation and the command
line are in `htpo_jax.config`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from htpo_jax.rewards.scoring import REWARD_FNS
from htpo_jax.rl.loss import AGG_MODES, LOSS_BOUNDS, LOSSES
from htpo_jax.rl.train_step import KL_ESTIMATORS


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

# Choices read from the tables that implement them (a new entry is a new allowed value).
LossName = Literal[tuple(k for k in LOSSES if k != "sft")]  # sft: the assets' supervised loss
AggMode = Literal[AGG_MODES]
KlKind = Literal[tuple(KL_ESTIMATORS)]
RewardFn = Literal[tuple(REWARD_FNS)]


def _sub(cls, help: str):
    """A nested sub-section (e.g. `model.lora`): its keys are `section.name.key`."""
    return field(default_factory=cls, metadata={"help": help, "check": None})


LORA_BASE_DTYPES = ("bfloat16", "float32", "int8", "nf4")  # int8 / nf4: QLoRA (models/quant.py)


@dataclass(frozen=True)
class LoraSection:
    """The `model.lora:` sub-section: low-rank adapters on the policy (models/lora.py)."""

    rank: int = _f(
        0,
        "LoRA rank r; 0 = off (full fine-tuning). > 0: only the adapters are trained, have AdamW "
        "state and are checkpointed; the frozen base (adapters off) is the KL reference.",
        NONNEG,
    )
    alpha: float = _f(16.0, "LoRA alpha: the adapter update is scaled by alpha / rank.", POS)
    target: str = _f(
        "_proj$",
        "Regex searched in each projection's module path (e.g. `layers.self_attn.q_proj`, "
        "`layers.mlp.down_proj`; with scan_layers=false `layers.3.self_attn.q_proj`); default: "
        "every attention and MLP projection (the embedding and lm_head are never adapted).",
        (lambda v: _regex_ok(v), "must be a valid, non-empty regular expression"),
    )
    base_dtype: Literal[LORA_BASE_DTYPES] = _f(
        "bfloat16",
        "Dtype the frozen base weights are stored in with LoRA on (replaces model.param_dtype "
        "for them; the adapters are float32). int8 / nf4 = QLoRA: every projection's kernel "
        "stored quantized (int8: per-output-channel absmax, ~1 byte a weight; nf4: NormalFloat-4 "
        "codes with one float32 absmax per block_size inputs, ~0.56 bytes) and dequantized in "
        "each forward; the embedding, head and norms bfloat16. Needs rank > 0.",
    )
    block_size: int = _f(
        64,
        "nf4 bases: weights per absmax scale along a projection's input (QLoRA's 64); must "
        "divide every projection's input size.",
        POS,
    )


def _regex_ok(v: str) -> bool:
    import re

    try:
        re.compile(v)
    except re.error:
        return False
    return bool(v)


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
    lora: LoraSection = _sub(LoraSection, "LoRA adapters (rank 0 = off).")


@dataclass(frozen=True)
class DataConfig:
    """The `data:` section: training / validation files, prompt length and padding, batch sizes."""

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
    """The `rollout:` section: the sampler (paged engine or static), its KV-cache budget, and the
    sampling settings of training and validation."""

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
        0,
        "KV-cache pages in the pool (engine; 0 = what the call can use, within the budget of "
        "kv_memory_fraction and cpu_kv_budget_gib).",
        NONNEG,
    )
    kv_memory_fraction: float = _f(
        0.5,
        "Most of the device's memory (and of what is free of it) the page pool may take when "
        "num_pages = 0.",
        OPEN_UNIT,
    )
    cpu_kv_budget_gib: float = _f(
        2.0, "On CPU, the most host RAM (GiB) the page pool may take when num_pages = 0.", POS
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
    placement: Literal["colocated", "separate"] = _f(
        "colocated",
        "colocated: every device decodes, then trains. separate: rollout.devices_per_host of "
        "each host's devices decode (their own mesh), the rest train (the mesh section "
        "sizes the trainer's mesh over them); weights go to the rollout devices after each "
        "update (docs/TRAINING.md, asynchronous RL).",
    )
    devices_per_host: int = _f(
        0,
        "With placement=separate: how many of each host's local devices decode (0 = half).",
        NONNEG,
    )
    partial: Literal["continue", "restart"] = _f(
        "continue",
        "trainer.async_mode=stream: a response unfinished at a weight update continues under "
        "the new weights (its prefix re-prefilled; every token keeps the log-prob of the "
        "policy that produced it), or restarts from its prompt.",
    )
    segment_tokens: int = _f(
        0,
        "trainer.async_mode=stream: new tokens per response per generation round (one engine "
        "call); longer responses carry over to later rounds and steps (0 = "
        "max_response_length / 4).",
        NONNEG,
    )


@dataclass(frozen=True)
class AlgorithmConfig:
    """The `algorithm:` section: the policy loss and its clip / entropy hyperparameters, dynamic
    sampling, the overlong penalty, the KL term and reward scoring."""

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
    kl_loss_type: KlKind = _f("low_var_kl", "KL estimator.")
    reward_fn: RewardFn = _f(
        "dapo_math", "Verifier when reward_routing=reward_fn (and of the reward worker pool)."
    )
    reward_routing: Literal["data_source", "reward_fn"] = _f(
        "data_source",
        "data_source: each row's verifier by its data_source, as verl (unknown source = "
        "error); reward_fn: algorithm.reward_fn for every row.",
    )
    reward_timeout_s: float = _f(10.0, "Per-response scoring time limit (0 = none).", NONNEG)
    reward_num_workers: int = _f(0, "Scoring processes (0 = in the main process).", NONNEG)
    rollout_is: Literal["off", "tis", "mis"] = _f(
        "off",
        "Off-policy correction of asynchronous rollouts: each token's loss times a weight of "
        "ratio = pi_old / pi_behaviour (the trainer's old log-prob over the one recorded at "
        "sampling): tis = min(ratio, cap); mis = ratio inside [1/cap, cap], else 0. Exactly 1 "
        "on tokens sampled by the current policy version (docs/LOSS.md).",
    )
    rollout_is_cap: float = _f(
        2.0,
        "The truncation / mask bound C of algorithm.rollout_is (> 1).",
        (lambda v: v > 1, "must be > 1"),
    )


@dataclass(frozen=True)
class OptimConfig:
    """The `optim:` section: AdamW, the learning-rate schedule, gradient clipping and the mini- /
    micro-batch split of an update."""

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
    micro_batch_size: int = _f(
        16,
        "Responses per gradient-accumulation chunk (when max_tokens_per_micro = 0). Either way "
        "the update is one path: the gradient sums every micro-batch's loss over the whole "
        "mini-batch's token count, and train/* metrics other than the losses are token-weighted "
        "means over micro-batches.",
        POS,
    )
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
    """The `trainer:` section: output directory, step count, seed, validation and logging cadence,
    and the run's watchdogs."""

    output_dir: str = _f("runs/htpo", "Run directory: logs, checkpoints, resolved config.")
    total_steps: int = _f(1000, "RL steps to run.", POS)
    seed: int = _f(1, "Seed for data order, sampling and initialization.", NONNEG)
    val_every: int = _f(10, "Validate every k steps (0 = only at start and end).", NONNEG)
    val_before_train: bool = _f(True, "Validate at step 0, before any update.")
    val_only: bool = _f(False, "Validate the (latest checkpoint's) policy once and exit.")
    log_every: int = _f(1, "Write metrics every k steps.", POS)
    loggers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = _f(
        ("jsonl",),
        "Metric sinks; jsonl (metrics.jsonl) is always on. tensorboard: "
        "<output_dir>/tensorboard (extra: tensorboard); wandb: a Weights & Biases run in "
        "<output_dir>/wandb, continued on resume (extra: wandb; WANDB_MODE=offline for no "
        "network). Was trainer.logger, still read.",
        (lambda v: "jsonl" in v, "must include jsonl (metrics.jsonl is always written)"),
    )
    wandb_project: str = _f("htpo_jax", "W&B project (trainer.loggers has wandb).")
    wandb_run_name: str = _f("", "W&B run name; empty = the name of trainer.output_dir.")
    wandb_tags: tuple[str, ...] = _f((), "W&B run tags.")
    progress_bar: bool = _f(True, "Show a tqdm progress bar.")
    max_nonfinite_steps: int = _f(
        3, "Stop after this many RL steps in a row with a non-finite update (0 = never).", NONNEG
    )
    collapse_window: int = _f(
        10, "Warn when train/accuracy is 0 this many steps in a row (0 = off).", NONNEG
    )
    async_mode: Literal["off", "one_step", "stream"] = _f(
        "off",
        "off: sample then train with the same weights (the paper's recipe). one_step: the "
        "rollout of step k+1 runs with the weights of step k while step k trains. stream: "
        "generation rounds never wait for a step's longest response; finished groups wait in "
        "a buffer, unfinished responses carry over (rollout.partial) (docs/TRAINING.md).",
    )
    max_staleness: int = _f(
        1,
        "async_mode=stream: a group trains only while (current policy version - the oldest "
        "version that produced one of its tokens) <= this; older groups are dropped, counted.",
        NONNEG,
    )
    collective_timeout_s: float = _f(
        900.0,
        "Multi-host: longest wait of one host for the others at a sync point before the run "
        "stops with an error naming the stage (the watchdog).",
        POS,
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint:` section: how often to save, how many to keep, where, and resuming."""

    save_every: int = _f(10, "Save every k steps, and at the end (0 = only at the end).", NONNEG)
    max_to_keep: int = _f(3, "Checkpoints kept (oldest deleted).", POS)
    dir: str = _f("", "Checkpoint directory; empty = <trainer.output_dir>/checkpoints.")
    resume: bool = _f(True, "Resume from the latest checkpoint in dir if there is one.")
    allow_config_change: bool = _f(
        False, "Resume even when keys that change results differ from the checkpoint's config."
    )


@dataclass(frozen=True)
class MeshConfig:
    """The `mesh:` section: the device mesh's data, fsdp and tensor axis sizes."""

    data: int = _f(1, "Data-parallel axis size (-1 = the rest of the devices).", MESH)
    fsdp: int = _f(-1, "Parameter-sharding axis size (-1 = the rest).", MESH)
    tensor: int = _f(1, "Tensor-parallel axis size (-1 = the rest).", MESH)


@dataclass(frozen=True)
class DistributedConfig:
    """The `distributed:` section: whether and how jax.distributed.initialize is called."""

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
    """The whole run configuration: one frozen section per top-level YAML key."""

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
        return plain(dataclasses.asdict(self))

    @property
    def checkpoint_dir(self) -> str:
        """The run's checkpoint directory: checkpoint.dir, else <trainer.output_dir>/checkpoints."""
        if self.checkpoint.dir:
            return self.checkpoint.dir
        if "://" in self.trainer.output_dir:  # Path() would fold 'gs://' into 'gs:/'
            return self.trainer.output_dir.rstrip("/") + "/checkpoints"
        return str(Path(self.trainer.output_dir) / "checkpoints")


def plain(x):
    """`x` with tuples as lists, recursively (for JSON and YAML)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    return x


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
