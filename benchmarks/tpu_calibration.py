"""Calibration of the step model: two published TPU figures, estimated by `step_time`.

    python benchmarks/tpu_calibration.py             # roofline arithmetic only (seconds)
    python benchmarks/tpu_calibration.py --compile   # + the TPU compiler's figures (minutes)

Calibration, not comparison: the published numbers come from other code (maxtext, vLLM-TPU) on
v6e, and our programs are not theirs. The ratio says how far the step model's idealised
arithmetic (every matmul at peak, every byte at HBM speed, collectives overlapped) sits from
what a tuned stack reaches, so the paper-config estimate can be read with that in mind.

1. maxtext, Llama-3.1-8B pre-training on v6e-256: 7,207 tokens/s/chip, 45.5% MFU (maxtext's
   published v6e table). Here: our update program (jit_micro_grads + AdamW, FSDP over 256
   chips, full remat) on sequences of 8,192 tokens, 3 per chip (assumed: the table's
   per-device batch is not restated here), the model built from the public config below.
2. vLLM-TPU, Qwen3-8B decode, batch 8, 2,048 tokens in / 128 out on v6e-8: 1,212 output
   tokens/s. Here: our engine's layout (one engine per chip, weights replicated, one row each),
   prefill + decode; and the same arithmetic with the weights split 8 ways (vLLM's tensor
   parallelism), which our engine does not run, for scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from htpo_jax.infra.topology import resolve_target
from htpo_jax.models.model_config import ModelConfig
from htpo_jax.run.config import load_config
from htpo_jax.tools import step_time
from htpo_jax.tools.compile_programs import MODELS_DIR, prompt_width

# Public Llama-3.1-8B config.json sizes (meta-llama/Llama-3.1-8B); no weights are needed.
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}  # fmt: skip
SEQ, ROWS_PER_CHIP = 8192, 3
PUBLISHED_TRAIN = (7207.0, 0.455)  # tokens/s/chip, MFU
PUBLISHED_DECODE = 1212.0  # output tokens/s, v6e-8
DEFAULT = str(MODELS_DIR.parent / "default.yaml")


def compiled_factors(cfg, target, model_dir: Path, programs: list[str], shape) -> dict:
    """{stage: (factor, label)} from compiling `programs` on `target` (compile_check --time)."""
    from htpo_jax.tools.compile_check import run_check

    report = run_check(cfg, target, headroom=0.1, programs=programs,
                       model_config=str(model_dir / "config.json"), time_costs=True)  # fmt: skip
    return step_time.compiler_factors(report, cfg, target, shape)


def training_case(model_dir: Path, compile_: bool) -> dict:
    target = resolve_target("v6e-256", None, None)
    rows = ROWS_PER_CHIP * target.chips
    base = ["model.dtype=bfloat16", "model.param_dtype=float32", "model.remat=true",
            "data.max_prompt_length=64", "data.pad_to_multiple=64", "rollout.n=1",
            f"data.train_batch_size={rows}", f"data.gen_batch_size={rows}",
            f"optim.mini_batch_size={rows}", f"optim.micro_batch_size={rows}",
            f"optim.max_tokens_per_micro={ROWS_PER_CHIP * SEQ}", "optim.ppo_epochs=1"]  # fmt: skip
    cfg = load_config(DEFAULT, [*base, f"model.path={model_dir}"])
    p = prompt_width(cfg)
    cfg = load_config(DEFAULT, [*base, f"model.path={model_dir}",
                                f"rollout.max_response_length={SEQ - p}"])  # fmt: skip
    shape = step_time.Shape.of(ModelConfig.from_pretrained(model_dir), 2)
    cal = compiled_factors(cfg, target, model_dir, ["update"], shape) if compile_ else {}
    f = {s: cal[s][0] if s in cal else 1.0 for s in step_time.STAGES}
    tr = step_time.train_costs(cfg, target, shape, np.full(rows, SEQ - p), p, f)
    seconds = tr["seconds"]["update"] + tr["seconds"]["optimizer"]
    rate = rows * SEQ / seconds / target.chips
    mfu = tr["flops_per_token"] * rows * SEQ / (seconds * target.chips * target.peaks.bf16_flops)
    src = ", ".join(cal[s][1] for s in ("update", "optimizer") if s in cal) or "roofline"
    return {"seconds": seconds, "tokens_per_s_per_chip": rate, "mfu": mfu, "source": src}


def decode_case(compile_: bool, tensor: int = 1) -> dict:
    target = resolve_target("v6e-8", None, None)
    model_dir = MODELS_DIR / "Qwen3-8B-Base"
    mesh = ["mesh.fsdp=-1", "mesh.tensor=1"] if tensor == 1 else ["mesh.fsdp=1", "mesh.tensor=8"]
    cfg = load_config(DEFAULT, [f"model.path={model_dir}", "model.dtype=bfloat16",
                                "data.max_prompt_length=2048", "data.gen_batch_size=8",
                                "data.train_batch_size=8", "optim.mini_batch_size=8",
                                "optim.micro_batch_size=8", "rollout.n=1",
                                "rollout.max_response_length=128", "rollout.max_num_seqs=8",
                                *mesh])  # fmt: skip
    model_cfg = ModelConfig.from_pretrained(model_dir)
    report = None
    if compile_:
        from htpo_jax.tools.compile_check import run_check

        report = run_check(cfg, target, headroom=0.1, programs=["engine"], time_costs=True,
                           model_config=str(model_dir / "config.json"))  # fmt: skip
    est = step_time.estimate(cfg, target, model_cfg, np.full(8, 128), prompt_len=2048,
                             gen_rounds=1.0, compiled=report)  # fmt: skip
    seconds = est["seconds"]["prefill"] + est["seconds"]["decode"]
    src = ", ".join(est["source"][s] for s in ("prefill", "decode"))
    return {"seconds": seconds, "tokens_per_s": 8 * 128 / seconds, "source": src}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="cost at the TPU compiler's figures")
    ap.add_argument("--json", help="also write the figures as JSON to this file")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(LLAMA_31_8B))
        train = training_case(Path(tmp), a.compile)
    decode = decode_case(a.compile)
    split = decode_case(False, tensor=8)
    print("calibration: published figures of other code on v6e vs this step model's estimate")
    print("| case | published | estimate | estimate / published | cost from |")
    print("| --- | --- | --- | --- | --- |")
    pt, pm = PUBLISHED_TRAIN
    r = train["tokens_per_s_per_chip"]
    print(f"| maxtext Llama-3.1-8B train, v6e-256, tokens/s/chip | {pt:,.0f} | {r:,.0f} | "
          f"{r / pt:.2f} | {train['source']} |")  # fmt: skip
    print(f"| same, MFU | {pm:.1%} | {train['mfu']:.1%} | {train['mfu'] / pm:.2f} | |")
    for label, d in (("our engine's layout", decode), ("weights split 8 ways, arithmetic", split)):
        r = d["tokens_per_s"]
        print(
            f"| vLLM-TPU Qwen3-8B decode b8 2048/128, v6e-8, {label}, tokens/s | "
            f"{PUBLISHED_DECODE:,.0f} | {r:,.0f} | {r / PUBLISHED_DECODE:.2f} | {d['source']} |"
        )
    if a.json:
        out = {"train": train, "decode": decode, "decode_tensor8": split}
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
