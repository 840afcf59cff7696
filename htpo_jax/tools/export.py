"""`python -m htpo_jax.export --run RUN_DIR --out HF_DIR [--step N]`: a training checkpoint back to
Hugging Face format (config.json + safetensors + tokenizer), loadable by transformers and vLLM.

RUN_DIR is a run's `trainer.output_dir` (it holds the resolved `config.yaml` and, by default, the
`checkpoints/` folder); the latest checkpoint is exported unless `--step` names one. A checkpoint
with non-finite (NaN/inf) parameters is refused: nothing is written. Errors are one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from htpo_jax.models.hf_io import from_pretrained, load_tokenizer, save_pretrained
from htpo_jax.rl.train_step import TrainState, make_optimizer
from htpo_jax.run import preflight, watch
from htpo_jax.run.checkpoint import Checkpointer, CheckpointMismatch
from htpo_jax.run.config import ConfigError, load_config


class NonFiniteWeights(ValueError):
    """The checkpoint's parameters hold NaN or inf."""


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> int:
    """Writes the checkpoint's policy to `out` in HF format; returns the exported step."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: --run must be a run's output_dir")
    cfg = load_config(config_path)
    preflight.check_model_dir(cfg.model.path, f"model.path in {config_path}")
    ckpt_dir = cfg.checkpoint.dir or str(Path(run_dir) / "checkpoints")
    steps = Checkpointer.steps_in(ckpt_dir, cfg.checkpoint.max_to_keep)  # before the model loads
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir}; have {steps}")
    model = from_pretrained(
        cfg.model.path,
        dtype=jnp.dtype(cfg.model.param_dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        scan_layers=cfg.model.scan_layers,  # the checkpoint's parameter layout
    )
    _, params = nnx.split(model)
    tx = make_optimizer(cfg.optim, 1)  # only the optimizer state's structure is needed
    template = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.key(0))
    with Checkpointer(ckpt_dir, cfg.checkpoint.max_to_keep, read_only=True) as ckpt:
        state, _ = ckpt.restore(step, template)
    if not watch.all_finite(state.params):
        raise NonFiniteWeights(
            f"checkpoint {step} in {ckpt_dir} holds non-finite (NaN/inf) parameters; "
            f"not exported (steps available: {steps})"
        )
    nnx.update(model, state.params)
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
    save_pretrained(model, out, tokenizer=tokenizer)
    return step


def main(argv=None) -> None:
    """Exports a run's checkpoint to an HF directory; a missing file, a bad config, or a mismatched
    or non-finite checkpoint exits 2 with one line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the run's trainer.output_dir")
    ap.add_argument("--out", required=True, help="directory to write the HF checkpoint to")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = ap.parse_args(argv)
    try:
        step = export(args.run, args.out, args.step)
    except (
        FileNotFoundError,
        ConfigError,
        CheckpointMismatch,
        NonFiniteWeights,
        preflight.LaunchError,
    ) as e:
        print(f"export: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported step {step} of {args.run} to {args.out}")


if __name__ == "__main__":
    main()
