"""Helpers shared by several test modules (a helper module, not collected by pytest): trainer
overrides for a tiny run, a checkpointable train state, random loss inputs and update batches.
The tiny models themselves are in tiny_models.py, the fixtures in conftest.py."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from htpo_jax.rl.train_step import UpdateBatch


def overrides(root: Path, out: Path, **extra):
    """`--set` arguments for a 2-step trainer run on `tiny_run_dir` (`root`), writing to `out`."""
    sets = {
        "model.path": str(root / "model"),
        "model.dtype": "float32",
        "model.remat": False,
        "data.train_files": str(root / "data" / "train.jsonl"),
        "data.val_files": str(root / "data" / "val.jsonl"),
        "data.train_batch_size": 2,
        "data.gen_batch_size": 4,
        "data.val_batch_size": 8,
        "data.max_prompt_length": 64,
        "data.pad_to_multiple": 16,
        "rollout.n": 4,
        "rollout.max_response_length": 16,
        "rollout.val_temperature": 1.0,
        "algorithm.overlong_buffer_len": 4,
        "algorithm.reward_timeout_s": 0,
        # A random model is almost never right: no dynamic sampling, or no group would survive.
        "algorithm.dynamic_sampling": False,
        "optim.learning_rate": 1e-3,
        "optim.warmup_steps": 0,
        "optim.mini_batch_size": 1,
        "optim.micro_batch_size": 2,
        "trainer.output_dir": str(out),
        "trainer.total_steps": 2,
        "trainer.val_every": 0,
        "trainer.progress_bar": False,
        "checkpoint.save_every": 1,
        "checkpoint.max_to_keep": 5,
    }
    sets.update(extra)
    return ["--set", *(f"{k}={v}" for k, v in sets.items())]


def make_state(seed=0):
    """A train-state-like pytree: params (float32 and bfloat16), optax state, step, typed key."""
    params = {
        "embed_vd": jnp.arange(12.0).reshape(4, 3) + seed,
        "layers": {"w_dd": jnp.ones((3, 3), jnp.bfloat16) * (seed + 1), "b_d": jnp.zeros(3)},
    }
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments and count
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.key(seed),
    }


def random_loss_batch(b, t, seed=0, dtype=np.float32):
    """Loss inputs `[log_prob, old_log_prob, entropy, advantages, mask, hard, correct]`, [b, t]."""
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.normal(size=(b, t))) * 2
    lp = old + rng.normal(size=(b, t)) * 0.3
    ent = rng.gamma(1.0, 1.0, (b, t))
    adv = np.repeat(rng.normal(size=(b, 1)), t, 1)
    mask = np.arange(t)[None] < rng.integers(1, t + 1, (b, 1))
    hard, correct = rng.random(b) < 0.5, rng.random(b) < 0.5
    f = [x.astype(dtype) for x in (lp, old, ent, adv, mask)]
    return f + [hard, correct]


def random_update_batch(n=8, p=6, r=10, seed=0):
    """An UpdateBatch of `n` rows, `p` left-padded prompt and `r` response columns, vocab 64."""
    rng = np.random.default_rng(seed)
    pmask = (np.arange(p)[None] >= rng.integers(0, p - 1, (n, 1))).astype(np.int32)
    rmask = (np.arange(r)[None] < rng.integers(1, r + 1, (n, 1))).astype(np.int32)
    ids = rng.integers(1, 64, (n, p + r)).astype(np.int32)
    rm = rmask.astype(np.float32)
    return UpdateBatch(
        input_ids=ids,
        attention_mask=np.concatenate([pmask, rmask], 1),
        response_mask=rm,
        old_log_prob=(-rng.gamma(2, 2, (n, r)) * rm).astype(np.float32),
        ref_log_prob=np.zeros_like(rm),
        advantages=(rng.normal(size=(n, 1)) * rm).astype(np.float32),
        hard=rng.random(n) < 0.5,
        correct=rng.random(n) < 0.5,
        prompt_len=p,
    )
