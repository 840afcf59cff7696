"""`python -m htpo_jax.export --run RUN_DIR --out DIR [--step N] [--adapter]`: a checkpoint back
to Hugging Face format (config.json + safetensors + tokenizer), loadable by transformers and
vLLM. A LoRA run (`model.lora.rank > 0`) is exported with its adapters merged into the base
weights (a QLoRA base, `base_dtype` int8 / nf4, dequantized first: the merged weights are the
quantized base plus the update, the policy the run trained, not the original weights plus it);
with `--adapter`, only the adapters are written, as a PEFT adapter directory
(`adapter_config.json` + `adapter_model.safetensors`) for `peft.PeftModel.from_pretrained`.

RUN_DIR is a run's `trainer.output_dir` (it holds the resolved `config.yaml` and, by default, the
`checkpoints/` folder); the latest checkpoint is exported unless `--step` names one. A checkpoint
with non-finite (NaN/inf) parameters is refused: nothing is written. Errors are one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from htpo_jax.models import lora
from htpo_jax.models.hf_io import load_tokenizer, save_pretrained
from htpo_jax.run import preflight
from htpo_jax.run.checkpoint import CheckpointMismatch
from htpo_jax.run.config import ConfigError, load_config
from htpo_jax.run.policy import NonFiniteWeights, restore_run


def export(
    run_dir: str | Path, out: str | Path, step: int | None = None, adapter: bool = False
) -> int:
    """Writes the checkpoint's policy to `out` in HF format at the stored parameter dtype (a
    LoRA run's adapters merged into the base), or with `adapter` only a LoRA run's adapters in
    PEFT format; returns the exported step."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: --run must be a run's output_dir")
    cfg = load_config(config_path)
    preflight.check_model_dir(cfg.model.path, f"model.path in {config_path}")
    model, cfg, step = restore_run(run_dir, step, cfg=cfg, dtype=cfg.model.param_dtype)
    if adapter:
        if not lora.has_adapters(model):
            raise ValueError(f"--adapter: {run_dir} is not a LoRA run (model.lora.rank is 0)")
        write_peft_adapter(model, out, base_path=str(Path(cfg.model.path).resolve()))
        return step
    if lora.has_adapters(model):  # W + (alpha / r) A B, written in model.param_dtype
        model = lora.merge_adapters(model, dtype=cfg.model.param_dtype)
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
    save_pretrained(model, out, tokenizer=tokenizer)
    return step


def write_peft_adapter(model, out: str | Path, base_path: str = "") -> None:
    """`adapter_config.json` + `adapter_model.safetensors` (float32) in `out`: the adapters of
    `model` in the layout `peft.PeftModel.from_pretrained(hf_base, out)` loads."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = lora.peft_config(model, base_path)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(lora.peft_tensors(model), str(out / "adapter_model.safetensors"))


def main(argv=None) -> None:
    """Exports a run's checkpoint to an HF directory; a missing file, a bad config, or a mismatched
    or non-finite checkpoint exits 2 with one line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the run's trainer.output_dir")
    ap.add_argument("--out", required=True, help="directory to write the HF checkpoint to")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument(
        "--adapter",
        action="store_true",
        help="LoRA runs: write only the adapters, as a PEFT adapter directory",
    )
    args = ap.parse_args(argv)
    try:
        step = export(args.run, args.out, args.step, adapter=args.adapter)
    except (
        FileNotFoundError,
        ConfigError,
        CheckpointMismatch,
        NonFiniteWeights,
        preflight.LaunchError,
        ValueError,
    ) as e:
        print(f"export: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported step {step} of {args.run} to {args.out}")


if __name__ == "__main__":
    main()
