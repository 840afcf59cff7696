"""HTPO as a tunix loss: train the embedded default task (the arithmetic model in assets/) for a
few steps with tunix's DAPO learner and `policy_loss_fn="htpo"`, on CPU, offline.

    pip install -e ".[tunix]" && pip install --no-deps google-tunix==0.1.7
    python examples/tunix_htpo.py            # 40 steps, 4 to 5 min on 2 (shared) CPU cores

The model is loaded into tunix's own Qwen3 (`tunix.models.qwen3`) from `assets/arith_model`;
rollout is tunix's `vanilla` sampler; rewards are the paper's DAPO math score; the verifier's
verdict is `correct`. It prints, per step, the mean reward of the step's rollouts (each step
draws other prompts, so it is noisy) and tunix's logged loss (about 0: with one update per batch
the ratio is 1 and the advantages are centered per group), then the accuracy of the policy on
held-out problems (val.jsonl, sampled at temperature 1) before and after training. `--loss grpo`
runs tunix's own loss (DAPO's token-mean with clip-higher: tunix's `grpo` policy loss under its
`DAPOConfig`) on the same setup.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from pathlib import Path

import jax
import numpy as np
import optax
from transformers import AutoTokenizer
from tunix.models.qwen3 import model as qwen3_model
from tunix.models.qwen3 import params as qwen3_params
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import dapo_learner
from tunix.rl.rollout import base_rollout

from htpo_jax.integrations.tunix import HTPOConfig, HTPOLearner
from htpo_jax.rewards.dapo_math import dapo_math_score

_TUNIX_APPLY_ROPE = qwen3_model.apply_rope
ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "assets" / "arith_model"
TRAIN_FILE = ROOT / "assets" / "arith" / "train.jsonl"
VAL_FILE = ROOT / "assets" / "arith" / "val.jsonl"


def tunix_model(mesh):
    """The shipped Qwen3-style model as tunix's Qwen3 (float32, its safetensors loader)."""
    hf = json.loads((MODEL_DIR / "config.json").read_text())
    # tunix 0.1.7's Qwen3 attention calls apply_rope without the config's rope_theta
    # (tunix/models/qwen3/model.py:501-510), so every model gets the default 1e6 of line 372;
    # the shipped model was trained with 10,000: without this its logits differ from
    # transformers' by up to 0.4 from position 1 on, and it never answers right.
    rope = functools.partial(_TUNIX_APPLY_ROPE, rope_theta=hf["rope_theta"])
    qwen3_model.apply_rope = rope
    cfg = qwen3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf["rope_theta"]),
        norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf["tie_word_embeddings"],
    )
    return qwen3_params.create_model_from_safe_tensors(str(MODEL_DIR), cfg, mesh)


def read_rows(path: Path, tokenizer) -> list[tuple[str, str]]:
    """(chat-formatted prompt, answer) of each row of a DAPO-layout JSONL file."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        (
            tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
            r["reward_model"]["ground_truth"],
        )
        for r in rows
    ]


def batches(tokenizer, batch_size: int, steps: int, seed: int):
    """`steps` batches of `batch_size` chat-formatted prompts with their answers."""
    rows = read_rows(TRAIN_FILE, tokenizer)
    random.Random(seed).shuffle(rows)
    rows = rows[: batch_size * steps]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [prompt for prompt, _ in chunk]
        # numpy columns, as a grain loader yields them: tunix repeats each batch's leaves with
        # a tree map, which would split a Python list into one leaf per string
        out.append(
            {
                "prompts": np.asarray(prompts),
                "answer": np.asarray([answer for _, answer in chunk]),
            }
        )
    return out


class Scorer:
    """The DAPO math reward and verdict, recording each training step's mean reward."""

    def __init__(self):
        self.train_rewards: list[float] = []

    def reward(self, prompts, completions, answer, mode=None, **kwargs):
        """tunix reward function: the DAPO math score (+1 right, -1 wrong)."""
        scores = [dapo_math_score(c, a)["score"] for c, a in zip(completions, answer, strict=True)]
        if mode is None or "train" in str(mode).lower():
            self.train_rewards.append(float(np.mean(scores)))
        return scores

    @staticmethod
    def correct(prompts, completions, answer, **kwargs):
        """HTPO's `correct` flag: the verifier's verdict."""
        return [
            bool(dapo_math_score(c, a)["acc"]) for c, a in zip(completions, answer, strict=True)
        ]


def accuracy(cluster, rows: list[tuple[str, str]], samples: int) -> float:
    """Mean verdict of `samples` sampled responses (the rollout's temperature 1.0) to each
    held-out prompt, with the policy the rollout engine holds now."""
    prompts = [prompt for prompt, _ in rows for _ in range(samples)]
    answers = [answer for _, answer in rows for _ in range(samples)]
    out = cluster.generate(prompts=prompts, mode=rl_cluster_lib.Mode.EVAL)
    return float(np.mean(Scorer.correct(prompts, out.text, answers)))


def build(args):
    """tunix's RL cluster (actor, reference, vanilla rollout) on one CPU device."""
    # Auto axes: tunix's models index with implicit shardings (jax's make_mesh defaults to
    # Explicit axes, where their embedding lookup fails)
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    training = rl_cluster_lib.RLTrainingConfig(
        # the default run's optimizer: Adam, 2 warmup steps, global-norm clip 1.0
        actor_optimizer=optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adam(optax.linear_schedule(0.0, args.lr, 2)),
        ),
        eval_every_n_steps=10**6,
        max_steps=args.steps,
        # no logging backends: tunix would start a W&B run whenever wandb imports, and it hooks
        # every backend into jax.monitoring for the rest of the process; the metric history
        # this example prints is kept by tunix's logger either way
        metrics_logging_options=None,
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=64,
        max_prompt_length=64,
        kv_cache_size=160,
        temperature=1.0,
        eos_tokens=[tokenizer.eos_token_id],
    )
    cluster = rl_cluster_lib.ClusterConfig(
        role_to_mesh={r: mesh for r in rl_cluster_lib.Role},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=training,
        rollout_config=rollout,
    )
    actor = tunix_model(mesh)
    reference = tunix_model(mesh)
    return rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=tokenizer, cluster_config=cluster
    ), tokenizer


def learner(args, cluster, scorer: Scorer):
    """HTPOLearner (our loss) or tunix's DAPOLearner with its own `grpo` policy loss."""
    common = dict(num_generations=args.n, overlong_buffer=None, beta=None)
    if args.loss == "htpo":
        cfg = HTPOConfig(**common)
        return HTPOLearner(cluster, cfg, reward_fns=[scorer.reward], correct_fn=scorer.correct)
    cfg = dapo_learner.DAPOConfig(**common)
    return dapo_learner.DAPOLearner(cluster, cfg, reward_fns=[scorer.reward])


def main(argv=None):
    """Run the example and print per-step reward and loss."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loss", choices=("htpo", "grpo"), default="htpo")
    p.add_argument("--val-prompts", type=int, default=128, help="held-out prompts (val.jsonl)")
    p.add_argument("--val-samples", type=int, default=4, help="responses per held-out prompt")
    args = p.parse_args(argv)
    cluster, tokenizer = build(args)
    scorer = Scorer()
    rl = learner(args, cluster, scorer)
    held_out = read_rows(VAL_FILE, tokenizer)[: args.val_prompts]
    acc_before = accuracy(cluster, held_out, args.val_samples)
    t0 = time.time()
    rl.train(batches(tokenizer, args.batch, args.steps, args.seed))
    wall = time.time() - t0
    acc_after = accuracy(cluster, held_out, args.val_samples)
    history = cluster.actor_trainer.metrics_logger.get_metric_history("actor", "loss", "train")
    losses = [float(x) for x in history]
    rewards = scorer.train_rewards
    for i, r in enumerate(rewards):
        loss = losses[i] if i < len(losses) else float("nan")
        print(f"step {i + 1}: reward_mean {r:+.3f}  loss {loss:+.4f}")
    half = len(rewards) // 2
    print(
        f"{args.loss}: reward_mean {rewards[0]:+.3f} (step 1) -> {rewards[-1]:+.3f} "
        f"(step {len(rewards)}); mean of the first half {np.mean(rewards[:half]):+.3f}, "
        f"of the second half {np.mean(rewards[half:]):+.3f}; {wall:.0f} s"
    )
    n = args.val_prompts * args.val_samples
    print(f"held-out accuracy ({n} responses): {acc_before:.3f} (start) -> {acc_after:.3f} (end)")
    return rewards, losses, (acc_before, acc_after)


if __name__ == "__main__":
    main()
