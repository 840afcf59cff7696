"""LoRA adapters (`model.lora`) on the run's model: adding them to a loaded model, what a
checkpoint holds (the adapters only, with LoRA), and a run's checkpoint back into a model (for
export and evaluate), with or without adapters.

With `model.lora.rank > 0` the TrainState's params are the whole adapted model (frozen base +
adapters: the sampler and the scorer use them as they are), but the optimizer state covers the
adapters only (`train_step.split_trainable`) and a checkpoint stores only the adapters: the base
is re-read from `model.path` on resume, export and evaluate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from htpo_jax.models import lora
from htpo_jax.rl.train_step import StepConfig, TrainState, make_optimizer, split_trainable
from htpo_jax.run.checkpoint import Checkpointer


def lora_spec(cfg) -> lora.LoraSpec | None:
    """The run's adapter settings, or None when `model.lora.rank` is 0."""
    c = cfg.model.lora
    if not c.rank:
        return None
    return lora.LoraSpec(rank=c.rank, alpha=c.alpha, target=c.target, base_dtype=c.base_dtype)


def attach_adapters(model, cfg, mesh=None) -> int:
    """Adds the configured adapters to `model` in place (seeded by `trainer.seed`); returns how
    many projections got one (0 with LoRA off)."""
    spec = lora_spec(cfg)
    if spec is None:
        return 0
    return lora.add_adapters(model, spec, seed=cfg.trainer.seed, mesh=mesh)


def checkpoint_view(state: TrainState, cfg) -> TrainState:
    """What a checkpoint stores of `state`: all of it, or with LoRA the adapters instead of the
    whole parameter state (the base is `model.path`, unchanged)."""
    if lora_spec(cfg) is None:
        return state
    return state.replace(params=lora.split_adapters(state.params)[0])


def from_checkpoint_view(restored: TrainState, full_params: nnx.State, cfg) -> TrainState:
    """A restored `checkpoint_view` made whole again: its adapters joined with the base of
    `full_params`."""
    if lora_spec(cfg) is None:
        return restored
    return restored.replace(params=lora.with_adapters(full_params, restored.params))


def init_opt_state(tx, params: nnx.State, cfg):
    """The optimizer state of a fresh run: over the trainable parameters only."""
    return tx.init(split_trainable(params, StepConfig.from_config(cfg))[0])


def restore_policy(model, cfg, ckpt_dir: str, step: int):
    """`model` (loaded from `model.path`, no adapters) updated in place with checkpoint `step`
    of a run with config `cfg`, adapters added first when the run had them; returns the model's
    parameter state as restored (for a finiteness check)."""
    attach_adapters(model, cfg)
    _, params = nnx.split(model)
    tx = make_optimizer(cfg.optim, 1)  # only the optimizer state's structure is needed
    template = TrainState(
        params, init_opt_state(tx, params, cfg), jnp.zeros((), jnp.int32), jax.random.key(0)
    )
    with Checkpointer(ckpt_dir, cfg.checkpoint.max_to_keep, read_only=True) as ckpt:
        state, _ = ckpt.restore(step, checkpoint_view(template, cfg))
    state = from_checkpoint_view(state, params, cfg)
    nnx.update(model, state.params)
    return state.params
