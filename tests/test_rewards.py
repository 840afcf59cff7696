"""Rewards: golden DAPO cases from the official code, overlong penalty, time limits."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from htpo_jax.rewards import (
    RewardPool,
    compute_rewards,
    dapo_math_score,
    math_verify_score,
    normalize_final_answer,
    overlong_penalty,
    score_batch,
)

GOLDEN = Path(__file__).parent / "golden" / "dapo_math_reward_cases.jsonl"
CASES = [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]


def test_golden_file_has_all_cases():
    assert len(CASES) == 150


@pytest.mark.parametrize("i", range(len(CASES)))
def test_dapo_math_golden(i):
    case = CASES[i]
    out = dapo_math_score(case["solution"], case["ground_truth"])
    assert out == {"score": case["score"], "acc": case["acc"], "pred": case["pred"]}
    assert type(out["score"]) is float and type(out["acc"]) is bool


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("x = 12", "12"),
        ("1,000", "1000"),
        ("\\text{(B)}", "(B)"),
        ("$\\frac12$", "\\frac{1}{2}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("90^\\circ", "90"),
        ("5 cm", "5"),
        ("\\boxed{7}", "7"),
    ],
)
def test_normalize_final_answer(raw, norm):
    assert normalize_final_answer(raw) == norm


def test_only_tail_is_read():
    head = "Answer: 5\n" + "x" * 400
    assert dapo_math_score(head, "5")["pred"] == "[INVALID]"
    assert dapo_math_score("x" * 400 + "\nAnswer: 5", "5")["acc"] is True


def test_strict_box():
    out = dapo_math_score("so \\boxed{42}", "42", strict_box=True)
    assert out == {"score": 1.0, "acc": True, "pred": "42"}
    assert dapo_math_score("Answer: 42", "42", strict_box=True)["pred"] == "[INVALID]"


def test_math_verify_score():
    assert math_verify_score("The answer is $\\frac{1}{2}$", "0.5")["acc"] is True
    assert math_verify_score("Answer: 0.5", "1/2")["score"] == 1.0
    out = math_verify_score("no number here", "3")
    assert out == {"score": -1.0, "acc": False, "pred": "[INVALID]"}


def test_overlong_penalty():
    # max 100, buffer 20: free up to 80 tokens, then linear to -factor at 100
    pen = overlong_penalty(np.array([0, 80, 90, 100, 110]), 100, 20, 1.0)
    np.testing.assert_allclose(pen, [0.0, 0.0, -0.5, -1.0, -1.5])
    assert overlong_penalty(95, 100, 20, 0.5) == pytest.approx(-0.375)
    # paper setting: 20480 max, 4096 buffer
    assert overlong_penalty(16384, 20480, 4096, 1.0) == 0.0
    assert overlong_penalty(20480, 20480, 4096, 1.0) == -1.0


def test_score_batch_inline_matches_single():
    sols = [c["solution"] for c in CASES[:20]]
    gts = [c["ground_truth"] for c in CASES[:20]]
    out = score_batch(sols, gts, timeout_s=5.0)
    assert out.score.dtype == np.float32 and out.acc.dtype == bool
    np.testing.assert_array_equal(out.score, [c["score"] for c in CASES[:20]])
    assert out.pred == [c["pred"] for c in CASES[:20]]
    assert out.n_timeouts == 0


def slow_on_hang(solution, ground_truth):
    """Module-level so spawned workers can unpickle it."""
    if solution == "hang":
        time.sleep(30)
    return dapo_math_score(solution, ground_truth)


def raises(solution, ground_truth):
    raise ZeroDivisionError


def test_inline_timeout_counts_and_continues():
    t0 = time.monotonic()
    out = score_batch(
        ["Answer: 1", "hang", "Answer: 3"], ["1", "2", "3"], fn=slow_on_hang, timeout_s=0.2
    )
    assert time.monotonic() - t0 < 5
    np.testing.assert_array_equal(out.score, [1.0, -1.0, 1.0])
    np.testing.assert_array_equal(out.timed_out, [False, True, False])
    assert out.acc.tolist() == [True, False, True]
    assert out.n_timeouts == 1


def test_verifier_exception_scores_minus_one():
    out = score_batch(["Answer: 1"], ["1"], fn=raises)
    assert out.score.tolist() == [-1.0] and out.pred == ["[ERROR]"] and out.n_timeouts == 0


def test_unknown_fn_name():
    with pytest.raises(ValueError, match="allowed"):
        score_batch(["a"], ["b"], fn="nope")


def test_pool_kills_hung_worker():
    sols = ["Answer: 1", "hang", "Answer: 3", "Answer: 4", "wrong"]
    gts = ["1", "2", "3", "4", "5"]
    with RewardPool(slow_on_hang, num_workers=2, timeout_s=1.0) as pool:
        t0 = time.monotonic()
        out = pool.score(sols, gts)
        assert time.monotonic() - t0 < 10
        np.testing.assert_array_equal(out.score, [1, -1, 1, 1, -1])
        np.testing.assert_array_equal(out.timed_out, [False, True, False, False, False])
        # the replaced worker keeps serving
        again = pool.score(["Answer: 7"], ["7"])
        assert again.acc.tolist() == [True]


def test_compute_rewards_from_config():
    from htpo_jax.run.config import load_config

    cfg = load_config(
        overrides=["rollout.max_response_length=100", "algorithm.overlong_buffer_len=20"]
    )
    reward, scored = compute_rewards(
        ["Answer: 1", "Answer: 2", "Answer: 3"], ["1", "2", "9"], np.array([10, 90, 100]), cfg
    )
    assert reward.dtype == np.float32
    np.testing.assert_allclose(reward, [1.0, 0.5, -2.0])
    assert scored.acc.tolist() == [True, True, False]  # acc ignores the penalty
    off = load_config(overrides=["algorithm.overlong_buffer_enable=false"])
    reward, _ = compute_rewards(["Answer: 1"], ["1"], [10**6], off)
    assert reward.tolist() == [1.0]
