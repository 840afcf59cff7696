"""The arithmetic task: correct reference solutions, determinism, tokenizer round trip."""

import json
import random

import pytest

from htpo_jax.rewards import dapo_math_score
from htpo_jax.tasks import arith


def test_reference_solutions_score_one():
    problems = arith.generate_problems(500, seed=3)
    for p in problems:
        assert eval(p.expression) == p.answer  # the rendering respects precedence
        assert p.answer >= 0
        assert p.score(p.solution) == {"score": 1.0, "acc": True, "pred": str(p.answer)}
        assert p.solution.splitlines()[-1] == f"Answer: {p.answer}"
        for step in p.steps:  # every shown step is true
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)
    wrong = problems[0].solution.replace(f"Answer: {problems[0].answer}", "Answer: -1")
    assert problems[0].score(wrong)["score"] == -1.0


def test_generator_is_deterministic_and_varied():
    a = arith.generate_problems(200, seed=7)
    assert a == arith.generate_problems(200, seed=7)
    assert a != arith.generate_problems(200, seed=8)
    assert len({p.expression for p in a}) > 150
    assert {len(p.steps) for p in a} == {1, 2, 3, 4}
    assert arith.make_problem(random.Random(0), 1).expression.count("+") <= 1
    with pytest.raises(ValueError):
        arith.make_problem(random.Random(0), 0)


def test_task_files(tmp_path):
    train, val = arith.write_task_data(tmp_path, n_train=300, n_val=50, seed=1)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    vrows = [json.loads(line) for line in val.read_text().splitlines()]
    assert len(rows) == 300 and len(vrows) == 50
    r = rows[0]
    assert r["data_source"] == "arith"
    assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"].startswith("Compute ")
    assert dapo_math_score(r["solution"], r["reward_model"]["ground_truth"])["acc"]
    train_q = {x["prompt"][0]["content"] for x in rows}
    assert not train_q & {x["prompt"][0]["content"] for x in vrows}
    again, _ = arith.write_task_data(tmp_path / "b", n_train=300, n_val=50, seed=1)
    assert again.read_text() == train.read_text()


def test_tokenizer_round_trip(tok_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) < 128
    assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    for p in arith.generate_problems(50, seed=0):
        for text in (p.question, p.solution):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)  # one token per character
            assert tok.decode(ids) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 1+2."}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt + "1+2=3\nAnswer: 3<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2
    assert tok.decode(ids, skip_special_tokens=True).endswith("Answer: 3")


def test_tokenizer_config_keeps_template_for_older_transformers(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == arith.CHAT_TEMPLATE


def test_cli(tmp_path, capsys):
    arith.main(["--out", str(tmp_path), "--n-train", "10", "--n-val", "5"])
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "val.jsonl").exists()
