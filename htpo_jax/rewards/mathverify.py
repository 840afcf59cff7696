"""Optional reward through HuggingFace math-verify: symbolic equivalence instead of string match.

Same return dict as `dapo_math_score`, so the two are interchangeable (`algorithm.reward_fn`).
math-verify's own timeouts use SIGALRM and would fight the per-item limit of `score_batch`, so
they are turned off here; `score_batch` bounds the time instead.
"""

from __future__ import annotations

import functools
import logging

from htpo_jax.rewards.dapo_math import INVALID, TAIL_CHARS


@functools.cache
def _quiet_math_verify() -> None:
    # Its only warnings here say "timeouts are disabled", which is on purpose (see above).
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def math_verify_score(solution: str, ground_truth: str) -> dict:
    """+1 if the last parsable answer in the response's tail equals the ground truth symbolically.

    The ground truth is read as LaTeX (as if boxed), falling back to a plain expression; the
    response as a plain expression or LaTeX (boxed, $...$, "final answer is ..."). Returns
    `{"score": 1.0 | -1.0, "acc": bool, "pred": str}`; pred is the matched text or "[INVALID]".
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    _quiet_math_verify()

    gold = parse(
        "\\boxed{" + ground_truth + "}",
        extraction_config=[LatexExtractionConfig()],
        parsing_timeout=None,
    )
    if not gold:
        gold = parse(
            ground_truth,
            extraction_config=[ExprExtractionConfig(), LatexExtractionConfig()],
            parsing_timeout=None,
        )
    pred = parse(
        solution[-TAIL_CHARS:],
        extraction_config=[ExprExtractionConfig(), LatexExtractionConfig()],
        parsing_timeout=None,
    )
    correct = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
    if pred:
        pred_text = str(pred[-1]) if len(pred) > 1 else str(pred[0])
    else:
        pred_text = INVALID
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred_text}
