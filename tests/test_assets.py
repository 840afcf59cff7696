"""The embedded default model under assets/: it loads, its tokenizer and data read, it has
learned the answer format."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htpo_jax.models import from_pretrained
from htpo_jax.rewards import dapo_math_score
from htpo_jax.rollout import generate
from htpo_jax.run.data import PromptDataset

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL_DIR = ASSETS / "arith_model"
DATA_DIR = ASSETS / "arith"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return from_pretrained(MODEL_DIR, dtype=jnp.float32)


def test_model_loads_and_is_small(model, tok):
    cfg = model.cfg
    assert cfg.model_type == "qwen3" and cfg.vocab_size == len(tok)
    assert cfg.eos_token_id == (tok.eos_token_id,) and cfg.pad_token_id == tok.pad_token_id
    assert cfg.num_params() < 1_000_000
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 2_000_000


def test_tokenizer_offline(tok):
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 1+2."}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_data_files_load(tok):
    train = PromptDataset([DATA_DIR / "train.jsonl"], tok, max_prompt_length=64)
    val = PromptDataset([DATA_DIR / "val.jsonl"], tok, max_prompt_length=64)
    assert len(val) == 200 and len(train) >= 1000
    assert train.n_skipped == val.n_skipped == 0
    batch = val.collate([0, 1, 2])
    assert batch.input_ids.shape[1] <= 64 and batch.attention_mask.sum(1).max() < 64
    assert batch.data_source == ("arith",) * 3 and all(gt.isdigit() for gt in batch.ground_truth)
    size = sum(f.stat().st_size for f in DATA_DIR.iterdir())
    assert size < 2_000_000


def test_greedy_decoding_has_learned_the_format(model, tok):
    val = PromptDataset([DATA_DIR / "val.jsonl"], tok, max_prompt_length=64)
    batch = val.collate(range(8))
    out = generate(
        model,
        batch.input_ids,
        batch.attention_mask,
        max_new_tokens=64,
        rng=jax.random.key(0),
        greedy=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert bool(out.finished.all())  # every response ends with <|im_end|>
    texts = tok.batch_decode(np.asarray(out.tokens), skip_special_tokens=True)
    for text in texts:
        lines = text.strip().splitlines()
        assert lines[-1].startswith("Answer: ") and all("=" in line for line in lines[:-1])
    truths = batch.ground_truth
    correct = [dapo_math_score(t, gt)["acc"] for t, gt in zip(texts, truths, strict=True)]
    assert sum(correct) >= 4  # greedy accuracy on val is ~0.85


@pytest.mark.slow
def test_make_default_model_script_runs_on_the_library(tmp_path, capsys):
    """The assets script end to end at a tiny size: SFT through the trainer's update, then the
    evaluation through sample_and_score / pass_at_k (the shipped files are not touched)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_default_model", ASSETS / "make_default_model.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(
        [
            "--data-dir", str(tmp_path / "arith"), "--model-dir", str(tmp_path / "model"),
            "--n-train", "16", "--n-val", "4", "--n-sft", "32", "--clean-steps", "2",
            "--noisy-steps", "1", "--batch", "8", "--n-samples", "2", "--max-new", "16",
            "--log-every", "1", "--layers", "1", "--hidden", "32", "--mlp", "64",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "sft step 3/3" in out and (tmp_path / "model" / "model.safetensors").is_file()
    res = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert set(res) >= {"acc_t1", "greedy_acc", "pass@2", "format_t1", "eos_t1"}
    assert 0 <= res["acc_t1"] <= res["pass@2"] <= 1
