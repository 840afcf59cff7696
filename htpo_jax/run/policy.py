"""The run's policy from its config, built one way everywhere: the model with its LoRA adapters
(`build_model`), the optimizer (`make_optimizer`), the first `TrainState` (`TrainState.create`),
and a run directory's checkpoint back into a model (`restore_run`, for `export` and `evaluate`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from htpo_jax.models.hf_io import decoder_options, from_pretrained
from htpo_jax.rl import train_step
from htpo_jax.rl.train_step import StepConfig, TrainState
from htpo_jax.run import adapters, watch
from htpo_jax.run.checkpoint import Checkpointer
from htpo_jax.run.config import Config, load_config


class NonFiniteWeights(ValueError):
    """The checkpoint's parameters hold NaN or inf."""


def model_kwargs(model_section, dtype: str | None = None) -> dict:
    """`from_pretrained` / `Decoder` keyword arguments of the `model:` section: compute and
    parameter dtypes (`dtype` overrides the compute dtype), parameter layout and attention."""
    return dict(
        dtype=jnp.dtype(dtype or model_section.dtype),
        param_dtype=jnp.dtype(model_section.param_dtype),
        **decoder_options(model_section),
    )


def build_model(cfg: Config, mesh=None, *, dtype: str | None = None):
    """The policy `Decoder` of `cfg.model` (weights from `model.path`), sharded on `mesh`, with
    the adapters of `model.lora` when its rank is > 0 (`adapters.attach_adapters`)."""
    model = from_pretrained(cfg.model.path, mesh=mesh, **model_kwargs(cfg.model, dtype))
    adapters.attach_adapters(model, cfg, mesh)
    return model


def updates_per_step(cfg: Config) -> int:
    """Optimizer updates per RL step: ppo_epochs x the mini-batches of a train batch."""
    o = cfg.optim
    return o.ppo_epochs * (cfg.data.train_batch_size // o.mini_batch_size)


def make_optimizer(cfg: Config):
    """The run's optimizer: `train_step.make_optimizer` over `trainer.total_steps` RL steps of
    `updates_per_step(cfg)` updates each."""
    return train_step.make_optimizer(cfg.optim, cfg.trainer.total_steps, updates_per_step(cfg))


def checkpoint_steps(run_dir: str | Path, cfg: Config) -> tuple[str, list[int]]:
    """(checkpoint dir, its steps) of the run in `run_dir` (the run's `Config.checkpoint_dir`
    with its output dir at `run_dir`, wherever the run was moved); creates nothing."""
    trainer = dataclasses.replace(cfg.trainer, output_dir=str(run_dir))
    ckpt_dir = dataclasses.replace(cfg, trainer=trainer).checkpoint_dir
    return ckpt_dir, Checkpointer.steps_in(ckpt_dir, cfg.checkpoint.max_to_keep)


def pick_step(ckpt_dir: str, steps: list[int], step: int | None) -> int:
    """`step`, or the latest of `steps`; FileNotFoundError naming the dir when there is none."""
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir}; have {steps}")
    return step


def restore_run(run_dir: str | Path, step: int | None = None, *, cfg: Config | None = None,
                dtype: str | None = None):  # fmt: skip
    """(model, cfg, step): the policy of a run directory's checkpoint `step` (None: the latest),
    built from its `config.yaml` (or `cfg`) with `build_model` (`dtype`: the compute dtype,
    default the run's). Missing config or checkpoint: FileNotFoundError; non-finite weights:
    NonFiniteWeights; a checkpoint of another shape: checkpoint.CheckpointMismatch. A LoRA
    run's checkpoint holds its adapters: they go onto the base of `model.path`."""
    if cfg is None:
        config_path = Path(run_dir) / "config.yaml"
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} not found: not a run's output_dir")
        cfg = load_config(config_path)
    ckpt_dir, steps = checkpoint_steps(run_dir, cfg)  # before the model loads
    step = pick_step(ckpt_dir, steps, step)
    model = build_model(cfg, dtype=dtype)
    _, params = nnx.split(model)
    tx = make_optimizer(cfg)  # only the optimizer state's structure is needed
    template = TrainState.create(params, tx, sc=StepConfig.from_config(cfg))
    with Checkpointer(ckpt_dir, cfg.checkpoint.max_to_keep, read_only=True) as ckpt:
        state, _ = ckpt.restore(step, adapters.checkpoint_view(template, cfg))
    state = adapters.from_checkpoint_view(state, params, cfg)
    if not watch.all_finite(state.params):
        raise NonFiniteWeights(
            f"checkpoint {step} in {ckpt_dir} holds non-finite (NaN/inf) parameters "
            f"(steps available: {steps})"
        )
    nnx.update(model, state.params)
    return model, cfg, step
