"""Regenerate the embedded default model and its data: `python assets/make_default_model.py`.

Writes, deterministically (fixed seeds; same machine type, same bytes):
  assets/arith/train.jsonl, val.jsonl   the arithmetic task (`htpo_jax.tasks.arith`), DAPO layout
  assets/arith_model/                   a tiny Qwen3-style decoder in HF format + the tokenizer

The model is trained by supervised fine-tuning on *noisy* reference solutions: every step's
result is off by a small amount with probability `--step-noise`, and the error propagates to the
later steps and the `Answer:` line. The model learns the format and the arithmetic, plus a
calibrated per-step error rate, so a sample at temperature 1.0 is right only a third of the time
while the right answer stays well inside its sampling distribution (high pass@8). That is the
weakness RL removes quickly: sharpening the result tokens toward their mode. At the end the
script prints the model's validation numbers (accuracy at T=1.0, greedy, pass@8, length, format).

Built on the library: the SFT step is the trainer's update (`train_step.jit_update` with the
`sft` loss, the mean NLL of the response tokens, and `make_optimizer`'s AdamW + cosine schedule),
and the evaluation samples and scores with `sample.sample_and_score` (the trainer's prompts,
sampler and reward) and estimates pass@n with `validation.pass_at_k`. The shipped weights were made
by an earlier version of this script with the same recipe written out by hand (same optimizer,
schedule and data order); rerunning it now gives a model of the same quality, not the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.models.decoder import Decoder
from htpo_jax.models.hf_io import from_pretrained, save_pretrained
from htpo_jax.models.model_config import ModelConfig
from htpo_jax.rl.sample import sample_and_score
from htpo_jax.rl.train_step import StepConfig, TrainState, UpdateBatch, jit_update, make_optimizer
from htpo_jax.rl.validation import pass_at_k
from htpo_jax.rollout import Sampler
from htpo_jax.run.config import load_config
from htpo_jax.run.data import PromptDataset, read_rows
from htpo_jax.tasks import arith

ASSETS = Path(__file__).resolve().parent
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


# ---------------------------------------------------------------------------------------------
# Noisy reference solutions


def noisy_solution(expression: str, rng: random.Random, step_noise: float) -> tuple[str, int]:
    """(solution text, its final answer) where each step's result is off by +-1/+-2 w.p. noise.

    The expression tree is evaluated in post-order, which is exactly the order of
    `ArithProblem.steps` (a parenthesized right operand is computed right before its use), so
    with `step_noise=0` this reproduces `ArithProblem.solution`. A wrong result is used by the
    later steps as written, so the solution stays self-consistent. Draws that would make any value
    negative are redrawn (the clean task has none).
    """
    tree = ast.parse(expression, mode="eval").body
    for _ in range(100):
        steps: list[str] = []
        answer = _noisy_eval(tree, rng, step_noise, steps)
        if all(int(line.rsplit("=", 1)[1]) >= 0 for line in steps):
            return "\n".join((*steps, f"Answer: {answer}")), answer
    raise RuntimeError(f"no non-negative noisy solution for {expression}")


def _noisy_eval(node, rng: random.Random, step_noise: float, steps: list[str]) -> int:
    """Post-order evaluation that appends one "a op b=c" line per operation to `steps`."""
    if isinstance(node, ast.Constant):
        return int(node.value)
    a = _noisy_eval(node.left, rng, step_noise, steps)
    b = _noisy_eval(node.right, rng, step_noise, steps)
    op = _OPS[type(node.op)]
    value = a + b if op == "+" else a - b if op == "-" else a * b
    if rng.random() < step_noise:
        value += rng.choice((-2, -1, 1, 2))
    steps.append(f"{a}{op}{b}={value}")
    return value


# ---------------------------------------------------------------------------------------------
# SFT data


def sft_arrays(problems, tok, rng: random.Random, step_noise: float, seq_len: int):
    """(input_ids [N, L], loss_mask [N, L]): chat prompt + noisy solution + EOS, right-padded.

    loss_mask[n, t] = 1 where token t+1 is a response token (the solution and the EOS).
    """
    n = len(problems)
    ids = np.full((n, seq_len), tok.pad_token_id, np.int32)  # [N, L]
    mask = np.zeros((n, seq_len), np.float32)  # [N, L]
    for i, p in enumerate(problems):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": p.question}], add_generation_prompt=True, tokenize=False
        )
        text, _ = noisy_solution(p.expression, rng, step_noise)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seq = p_ids + r_ids
        if len(seq) > seq_len:
            raise ValueError(f"sequence of {len(seq)} tokens > seq_len={seq_len}: {p.question}")
        ids[i, : len(seq)] = seq
        mask[i, len(p_ids) - 1 : len(seq) - 1] = 1.0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Model and SFT


def model_config(tok, args) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3",
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        head_dim=args.hidden // args.heads,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        qk_norm=True,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=(tok.eos_token_id,),
        pad_token_id=tok.pad_token_id,
    )


def sft(model: Decoder, phases, args) -> None:
    """AdamW on the masked next-token loss, one LR schedule over all phases; updates `model`.

    `phases`: a list of (input_ids [N, L], loss_mask [N, L], steps), trained in order. Each step
    is the trainer's update (`jit_update`, TrainState donated) with the `sft` loss: rows are
    whole sequences (prompt_len 1, so "response" token j is token 1 + j and its mask is
    loss_mask[:, j]); warmup + cosine to 5% of the peak, clipping at 1.0, b2 0.98, wd 0.01.
    """
    steps = sum(p[2] for p in phases)
    cfg = load_config(None, [
        f"optim.learning_rate={args.lr}", "optim.lr_schedule=cosine", "optim.min_lr_ratio=0.05",
        f"optim.warmup_steps={min(100, steps // 10)}", "optim.grad_clip=1.0", "optim.b2=0.98",
        "optim.weight_decay=0.01",
    ])  # fmt: skip
    tx = make_optimizer(cfg.optim, steps)
    step_cfg = StepConfig.from_config(cfg)
    step_cfg = dataclasses.replace(step_cfg, loss="sft", temperature=1.0)
    graphdef, params = nnx.split(model)
    state = TrainState.create(params, tx)
    update = jit_update(graphdef, tx, step_cfg)

    def step(state, ids_bt, mask_bt):
        b = ids_bt.shape[0]
        zeros = np.zeros((b, ids_bt.shape[1] - 1), np.float32)
        batch = UpdateBatch(
            input_ids=ids_bt, attention_mask=np.ones_like(ids_bt), response_mask=mask_bt[:, :-1],
            old_log_prob=zeros, ref_log_prob=zeros, advantages=zeros,
            hard=np.zeros(b, bool), correct=np.ones(b, bool), prompt_len=1,
        )  # fmt: skip
        state, metrics = update(state, jax.tree.map(lambda x: x[None], batch))  # [1, B, ...]
        return state, metrics["loss"]

    order_rng = np.random.default_rng(args.seed)
    i, t0, losses = 0, time.perf_counter(), []
    for ids, mask, phase_steps in phases:
        n = ids.shape[0]
        lengths = (ids != 0).sum(1)  # pad id 0 only pads
        order, pos = order_rng.permutation(n), 0
        for _ in range(phase_steps):
            if pos + args.batch > n:
                order, pos = order_rng.permutation(n), 0
            idx = np.sort(order[pos : pos + args.batch])
            pos += args.batch
            # trim the batch to its longest row (rounded up to 16): few shapes, less padding
            width = min(ids.shape[1], 16 * math.ceil(int(lengths[idx].max()) / 16))
            state, loss = step(state, ids[idx, :width], mask[idx, :width])
            losses.append(loss)
            i += 1
            if i % args.log_every == 0 or i == steps:
                mean = float(jnp.mean(jnp.stack(losses)))
                losses = []
                dt = time.perf_counter() - t0
                print(f"  sft step {i}/{steps}  loss {mean:.4f}  {dt:.0f}s", flush=True)
    nnx.update(model, state.params)


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, tok, val_file, *, n_samples, max_new, seed, batch=400) -> dict:
    """Accuracy at T=1.0 (mean over samples), greedy accuracy, pass@n, length, format rate.

    The trainer's validation path: `val_file`'s prompts as `PromptDataset` builds them, sampled
    and scored (`dapo_math` for the `arith` source) by `sample.sample_and_score`.
    """
    # the sampler and the verifier's settings; the overlong shaping (not in `acc`) must just fit
    sets = [f"rollout.max_response_length={max_new}", "algorithm.reward_timeout_s=0",
            f"algorithm.overlong_buffer_len={max(1, max_new // 4)}"]  # fmt: skip
    cfg = load_config(None, sets)
    dataset = PromptDataset([val_file], tok, max_prompt_length=64)
    sampler, params = Sampler.from_model(model), nnx.state(model)

    def run(n, temperature, key) -> tuple[np.ndarray, ...]:
        parts = []
        for i, b in enumerate(dataset.iter_batches(max(1, batch // n))):
            s = sample_and_score(
                sampler, params, tok, b, cfg, rng=jax.random.fold_in(key, i), n=n,
                temperature=temperature, top_p=1.0, top_k=-1,
            )  # fmt: skip
            fmt = [("Answer:" in t) for t in s.texts]
            parts.append((s.acc, s.lengths, np.array(fmt), s.finished))
        return tuple(np.concatenate(x).astype(float) for x in zip(*parts, strict=True))

    key = jax.random.key(seed)
    g_acc, _, g_fmt, _ = run(1, 0.0, key)  # temperature 0: greedy
    s_acc, s_len, s_fmt, s_eos = run(n_samples, 1.0, jax.random.fold_in(key, 1))
    per_problem = s_acc.reshape(len(dataset), n_samples)
    pass_n = [pass_at_k(n_samples, int(c), n_samples) for c in per_problem.sum(1)]
    return {
        "acc_t1": float(s_acc.mean()),
        "greedy_acc": float(g_acc.mean()),
        f"pass@{n_samples}": float(np.mean(pass_n)),
        "mean_len_t1": float(s_len.mean()),
        "max_len_t1": int(s_len.max()),
        "format_t1": float(s_fmt.mean()),
        "format_greedy": float(g_fmt.mean()),
        "eos_t1": float(s_eos.mean()),
        "frac_all_wrong": float((per_problem.max(1) == 0).mean()),
        "frac_all_right": float((per_problem.min(1) == 1).mean()),
    }


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ASSETS / "arith"))
    ap.add_argument("--model-dir", default=str(ASSETS / "arith_model"))
    ap.add_argument("--n-train", type=int, default=4000, help="RL training prompts")
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-sft", type=int, default=60000, help="SFT problems (disjoint from val)")
    ap.add_argument("--step-noise", type=float, default=0.3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--mlp", type=int, default=192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-ops", type=int, default=4)
    ap.add_argument("--max-product", type=int, default=50)
    ap.add_argument("--clean-steps", type=int, default=600, help="SFT steps on clean solutions")
    ap.add_argument("--noisy-steps", type=int, default=300, help="then steps on noisy ones")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seq-len", type=int, default=112)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the saved model")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    args = ap.parse_args(argv)
    data_dir, model_dir = Path(args.data_dir), Path(args.model_dir)

    t_start = time.perf_counter()
    if not args.eval_only:
        train_path, val_path = arith.write_task_data(
            data_dir,
            n_train=args.n_train,
            n_val=args.n_val,
            seed=args.seed,
            max_ops=args.max_ops,
            max_product=args.max_product,
        )
        print(f"wrote {train_path} ({train_path.stat().st_size / 1e6:.2f} MB), {val_path}")
    tok = arith.build_tokenizer()
    val, _ = read_rows(data_dir / "val.jsonl")
    val_questions = {content for row in val for _, content in row.messages}

    if not args.eval_only:
        pool = arith.generate_problems(
            args.n_sft * 2, args.seed + 1, max_ops=args.max_ops, max_product=args.max_product
        )
        sft_problems = [p for p in pool if p.question not in val_questions][: args.n_sft]
        noise_rng = random.Random(args.seed + 2)
        phases = [
            (*sft_arrays(sft_problems, tok, noise_rng, 0.0, args.seq_len), args.clean_steps),
            (
                *sft_arrays(sft_problems, tok, noise_rng, args.step_noise, args.seq_len),
                args.noisy_steps,
            ),
        ]
        cfg = model_config(tok, args)
        model = Decoder(cfg, rngs=nnx.Rngs(args.seed))
        print(
            f"model: {cfg.num_layers} layers x {cfg.hidden_size} wide, mlp {cfg.intermediate_size}"
            f", {cfg.num_params():,} params; SFT on {len(sft_problems)} problems, "
            f"step noise {args.step_noise}"
        )
        t0 = time.perf_counter()
        sft(model, phases, args)
        print(f"SFT wall time: {time.perf_counter() - t0:.0f}s")
        save_pretrained(model, model_dir, dtype=jnp.float32)
        arith.write_tokenizer(model_dir)

    model = from_pretrained(model_dir, dtype=jnp.float32)
    t0 = time.perf_counter()
    res = evaluate(
        model, tok, data_dir / "val.jsonl", n_samples=args.n_samples, max_new=args.max_new,
        seed=args.seed,
    )  # fmt: skip
    print(f"eval ({len(val)} val problems, {time.perf_counter() - t0:.0f}s):")
    print(json.dumps(res, indent=2))
    print(f"total wall time: {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
