"""The shipped YAML runs: every `configs/*.yaml` loads and validates; the paper run holds the
official train.sh values; the DAPO baseline differs from it only in the loss and run dirs."""

from pathlib import Path

import pytest
import yaml

from htpo_jax.run.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = CONFIGS / "qwen3_8b_dapo_math17k.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)  # raises ConfigError on an unknown key or a bad value
    assert cfg.model.path, f"{path.name}: model.path is empty"
    assert cfg.data.train_files, f"{path.name}: data.train_files is empty"
    # The update splits each mini-batch of responses into whole micro-batches.
    o = cfg.optim
    assert (o.mini_batch_size * cfg.rollout.n) % o.micro_batch_size == 0


def test_paper_config_is_train_sh():
    c = load_config(PAPER)
    assert c.model.path.endswith("Qwen3-8B-Base")
    assert (c.model.dtype, c.model.param_dtype, c.model.remat) == ("bfloat16", "float32", True)
    assert c.data.train_files[0].endswith("dapo-math-17k.parquet")
    assert c.data.val_files[0].endswith("aime-2024.parquet")
    assert c.data.max_prompt_length == 2048 and c.data.prompt_key == "prompt"
    assert (c.data.train_batch_size, c.data.gen_batch_size) == (128, 256)
    r = c.rollout
    assert r.n == 16 and r.max_response_length == 20480
    assert (r.temperature, r.top_p, r.top_k) == (1.0, 1.0, -1)
    assert (r.val_n, r.val_temperature, r.val_top_p) == (1, 1.0, 0.7)
    a = c.algorithm
    assert a.loss == "htpo" and a.loss_agg_mode == "token-mean"
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert a.difficulty_threshold == 0.6 and a.high_entropy_ratio == 0.2
    assert (a.drop_low_entropy_ratio, a.drop_high_entropy_ratio) == (0.006, 0.02)
    assert a.dynamic_sampling and a.dynamic_sampling_metric == "acc"
    assert a.max_num_gen_batches == 10
    assert a.overlong_buffer_enable and a.overlong_buffer_len == 4096
    assert a.overlong_penalty_factor == 1.0
    assert not a.use_kl_loss and a.reward_fn == "dapo_math"
    o = c.optim
    assert (o.learning_rate, o.warmup_steps, o.lr_schedule) == (1e-6, 10, "constant")
    assert (o.weight_decay, o.grad_clip) == (0.1, 1.0)
    assert (o.mini_batch_size, o.ppo_epochs) == (32, 1)
    assert (c.trainer.val_every, c.checkpoint.save_every, c.checkpoint.resume) == (10, 10, True)
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)


def test_dapo_baseline_is_the_paper_run_with_dapo_loss():
    htpo, dapo = load_config(PAPER).to_dict(), load_config(CONFIGS / "dapo_baseline.yaml").to_dict()
    assert dapo["algorithm"]["loss"] == "dapo"
    for d in (htpo, dapo):
        d["algorithm"].pop("loss")
        d["trainer"].pop("output_dir")
        d["checkpoint"].pop("dir")
    assert dapo == htpo
    # Its runs must not share a directory with the HTPO run (resume would pick up HTPO's state).
    paper, base = load_config(PAPER), load_config(CONFIGS / "dapo_baseline.yaml")
    assert base.checkpoint_dir != paper.checkpoint_dir
    assert base.trainer.output_dir != paper.trainer.output_dir


def test_dapo_baseline_resolves_to_the_file_it_replaced():
    """configs/dapo_baseline.yaml is a few lines on top of the paper config (`base:`); resolved,
    it is the full file it replaced (tests/golden/dapo_baseline_resolved.yaml, the output of
    `python -m htpo_jax.config --config configs/dapo_baseline.yaml` before the rewrite)."""
    text = (CONFIGS / "dapo_baseline.yaml").read_text()
    assert "base: qwen3_8b_dapo_math17k.yaml" in text
    old = yaml.safe_load(
        (Path(__file__).parent / "golden" / "dapo_baseline_resolved.yaml").read_text()
    )
    assert load_config(CONFIGS / "dapo_baseline.yaml").to_dict() == old


def test_paper_config_with_baseline_override():
    c = load_config(PAPER, ["algorithm.loss=dapo"])
    assert c.algorithm.loss == "dapo" and c.rollout.n == 16


def test_one_gpu_config_is_small():
    c = load_config(CONFIGS / "qwen3_0p6b_1gpu.yaml")
    assert "0.6B" in c.model.path or "1.7B" in c.model.path
    assert c.rollout.max_response_length <= 4096
    assert c.algorithm.overlong_buffer_len < c.rollout.max_response_length
    assert c.data.gen_batch_size * c.rollout.n <= 256  # one round's KV cache on one device
    assert c.algorithm.loss == "htpo"
