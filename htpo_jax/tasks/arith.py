"""A synthetic verifiable task for the embedded default model: multi-step integer arithmetic.

A problem is a short expression over small integers ("Compute (7+5)*3-4."); its reference
solution evaluates it one operation per line and ends with an `Answer: <n>` line, so the paper's
DAPO reward (`dapo_math_score`) verifies it unchanged. Also here: a ~100-token character-level
tokenizer with a ChatML template, saved as a `PreTrainedTokenizerFast` that
`transformers.AutoTokenizer.from_pretrained(dir)` loads offline, and writers for train/val JSONL
files in the DAPO-Math layout that `htpo_jax.run.data` reads.

Everything is deterministic in the seed: the generator draws only through `random.Random.random()`,
whose sequence Python guarantees across versions.

    python -m htpo_jax.tasks.arith --out assets/arith --n-train 20000 --n-val 500
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from htpo_jax.rewards.dapo_math import dapo_math_score

DATA_SOURCE = "arith"
PAD, BOS_TURN, EOS, UNK = "<pad>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS_TURN, EOS, UNK)  # ids 0..3, in this order
# Every printable ASCII character plus newline: 95 + 1 + 4 specials = 100 tokens.
CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n",)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MAX_OPERAND = 9
MAX_PRODUCT = 200  # keeps every intermediate value at most three digits


@dataclass(frozen=True)
class ArithProblem:
    """One problem: the expression, its one-operation-per-line steps and the answer."""

    expression: str  # e.g. "(7+5)*3-4"
    steps: tuple[str, ...]  # e.g. ("7+5=12", "12*3=36", "36-4=32")
    answer: int

    @property
    def question(self) -> str:
        """The prompt: `Compute <expression>.`"""
        return f"Compute {self.expression}."

    @property
    def solution(self) -> str:
        """The reference response: one step per line, then the answer line."""
        return "\n".join((*self.steps, f"Answer: {self.answer}"))

    @property
    def ground_truth(self) -> str:
        """The answer as a string (what the verifier compares with)."""
        return str(self.answer)

    def score(self, response: str) -> dict:
        """`response` scored against the answer by the DAPO reward (`dapo_math_score`)."""
        return dapo_math_score(response, self.ground_truth)


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform in [lo, hi] from `rng.random()` alone (stable across Python versions)."""
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _pick_op(rng: random.Random, a: int, b: int, max_product: int = MAX_PRODUCT) -> str:
    """A random operator that keeps the value non-negative and small."""
    ops = ["+"]
    if b <= a:
        ops.append("-")
    if a * b <= max_product:
        ops.append("*")
    return ops[_randint(rng, 0, len(ops) - 1)]


def make_problem(rng: random.Random, n_ops: int, max_product: int = MAX_PRODUCT) -> ArithProblem:
    """A chain of `n_ops` binary operations; some right operands are a parenthesized pair.

    The expression is built left to right; the accumulated part is parenthesized when a '*'
    follows a '+'/'-' so that normal precedence gives the chain's order of evaluation. A '*' is
    drawn only when the product is at most `max_product` (smaller: easier multiplications).
    """
    if n_ops < 1:
        raise ValueError(f"n_ops must be >= 1, got {n_ops}")
    value = _randint(rng, 1, MAX_OPERAND)
    expr, prec = str(value), 3  # prec: 3 atom, 2 product, 1 sum
    steps: list[str] = []
    left = n_ops
    while left > 0:
        if left >= 2 and rng.random() < 0.25:  # right operand "(x op y)", computed first
            x, y = _randint(rng, 1, MAX_OPERAND), _randint(rng, 1, MAX_OPERAND)
            inner_op = _pick_op(rng, x, y, max_product)
            operand = _apply(x, inner_op, y)
            steps.append(f"{x}{inner_op}{y}={operand}")
            operand_text = f"({x}{inner_op}{y})"
            left -= 1
        else:
            operand = _randint(rng, 1, MAX_OPERAND)
            operand_text = str(operand)
        op = _pick_op(rng, value, operand, max_product)
        if op == "*" and prec == 1:
            expr = f"({expr})"
        new_value = _apply(value, op, operand)
        steps.append(f"{value}{op}{operand}={new_value}")
        expr = f"{expr}{op}{operand_text}"
        prec = 2 if op == "*" else 1
        value = new_value
        left -= 1
    return ArithProblem(expression=expr, steps=tuple(steps), answer=value)


def generate_problems(
    n: int, seed: int, min_ops: int = 1, max_ops: int = 4, max_product: int = MAX_PRODUCT
) -> list[ArithProblem]:
    """`n` problems with uniform [min_ops, max_ops] operations; same seed, same list."""
    rng = random.Random(seed)
    return [make_problem(rng, _randint(rng, min_ops, max_ops), max_product) for _ in range(n)]


def to_row(problem: ArithProblem, split: str, index: int) -> dict:
    """One dataset row in the DAPO-Math layout (plus the reference solution, for SFT)."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": problem.question}],
        "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
        "solution": problem.solution,
        "extra_info": {"split": split, "index": index},
    }


def write_task_data(
    out_dir: str | Path,
    n_train: int = 20000,
    n_val: int = 500,
    seed: int = 0,
    min_ops: int = 1,
    max_ops: int = 4,
    max_product: int = MAX_PRODUCT,
) -> tuple[Path, Path]:
    """Write `train.jsonl` and `val.jsonl` into out_dir; val holds no expression seen in train."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = generate_problems(n_train, seed, min_ops, max_ops, max_product)
    seen = {p.expression for p in train}
    val: list[ArithProblem] = []
    rng = random.Random(seed + 1_000_003)
    while len(val) < n_val:
        p = make_problem(rng, _randint(rng, min_ops, max_ops), max_product)
        if p.expression not in seen:
            seen.add(p.expression)
            val.append(p)
    paths = out / "train.jsonl", out / "val.jsonl"
    for path, split, problems in zip(paths, ("train", "val"), (train, val), strict=True):
        with path.open("w") as fh:
            for i, p in enumerate(problems):
                fh.write(json.dumps(to_row(p, split, i)) + "\n")
    return paths


def build_tokenizer():
    """The character-level tokenizer (a `PreTrainedTokenizerFast`) with the ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # one token per character; the special tokens are matched before this split
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[BOS_TURN],
        model_max_length=4096,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_tokenizer(out_dir: str | Path) -> Path:
    """Save the tokenizer files into out_dir (loadable with AutoTokenizer, offline)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(str(out))
    # Recent transformers keep the template in chat_template.jinja; older ones (4.4x) read it
    # from tokenizer_config.json. Write both so either loads it.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    """Writes the task's tokenizer and train/val JSONL files into --out."""
    p = argparse.ArgumentParser(description="Write the arithmetic task's tokenizer and data.")
    p.add_argument("--out", required=True, help="directory for tokenizer files and JSONL data")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-ops", type=int, default=1)
    p.add_argument("--max-ops", type=int, default=4)
    p.add_argument("--max-product", type=int, default=MAX_PRODUCT)
    args = p.parse_args(argv)
    write_tokenizer(args.out)
    train, val = write_task_data(
        args.out,
        args.n_train,
        args.n_val,
        args.seed,
        args.min_ops,
        args.max_ops,
        args.max_product,
    )
    print(f"wrote tokenizer, {train} and {val}")


if __name__ == "__main__":
    main()
