"""LoRA adapters (`model.lora`) on the run's model: adding them to a loaded model
(`run/policy.build_model` calls it), and what a checkpoint holds (the adapters only, with LoRA;
`run/policy.restore_run` makes a restored one whole again).

With `model.lora.rank > 0` the TrainState's params are the whole adapted model (frozen base +
adapters: the sampler and the scorer use them as they are), but the optimizer state covers the
adapters only (`train_step.split_trainable`) and a checkpoint stores only the adapters: the base
is re-read from `model.path` on resume, export and evaluate (a QLoRA base, `base_dtype` int8 /
nf4, is quantized again from it: the quantization is deterministic).
"""

from __future__ import annotations

from flax import nnx

from htpo_jax.models import lora
from htpo_jax.rl.train_step import TrainState


def lora_spec(cfg) -> lora.LoraSpec | None:
    """The run's adapter settings, or None when `model.lora.rank` is 0."""
    c = cfg.model.lora
    if not c.rank:
        return None
    return lora.LoraSpec(rank=c.rank, alpha=c.alpha, target=c.target, base_dtype=c.base_dtype,
                         block_size=c.block_size)  # fmt: skip


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
