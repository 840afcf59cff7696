"""The trainer end to end on a tiny random model: smoke run, resume exactness, bad config."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import overrides

from htpo_jax.infra import distributed as dist
from htpo_jax.run.config import load_config
from htpo_jax.run.metrics import read_metrics
from htpo_jax.run.train import main

VOLATILE = ("time/",)  # wall-clock metrics differ between runs


@pytest.mark.slow
def test_two_step_smoke(tiny_run_dir, tmp_path):
    out = tmp_path / "run"
    summary = main(overrides(tiny_run_dir, out))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "val/accuracy" in records[0] and "val/accuracy" in records[-1]
    for key in (
        "train/loss",
        "train/reward_mean",
        "train/accuracy",
        "train/entropy",
        "train/pg_clipfrac",
        "response_length/mean",
        "time/step",
        "group_frac/hard_wrong_high",
    ):
        assert key in records[1], key
    assert records[0]["val/arith/mean@1"] == records[0]["val/accuracy"]  # one data source
    assert records[1]["train/nonfinite_skipped"] == 0 and records[1]["train/lr"] > 0
    fracs = sum(records[1][k] for k in records[1] if k.startswith("group_frac/"))
    assert abs(fracs - 1.0) < 1e-5
    assert summary["val_accuracy_before"] is not None
    assert (out / "checkpoints").is_dir() and (out / "config.yaml").exists()

    # The trained policy back in HF format: transformers loads it and agrees with our model.
    import torch
    from transformers import AutoModelForCausalLM

    from htpo_jax.models.hf_io import from_pretrained
    from htpo_jax.tools.export import export

    assert export(out, tmp_path / "hf") == 2
    ours = from_pretrained(tmp_path / "hf", dtype=jnp.float32)
    start = from_pretrained(tiny_run_dir / "model", dtype=jnp.float32)
    ids = np.arange(1, 13, dtype=np.int32)[None]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), hf_logits, atol=2e-4)
    assert np.abs(np.asarray(ours(ids)) - np.asarray(start(ids))).max() > 1e-4  # it trained


@pytest.mark.slow
def test_val_only_validates_and_exits(tiny_run_dir, tmp_path):
    out = tmp_path / "val_only"
    summary = main(overrides(tiny_run_dir, out, **{"trainer.val_only": True}))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0]
    assert "val/arith/mean@1" in records[0] and summary["val_accuracy_after"] is not None
    assert not any(k.startswith("train/") for k in records[0])
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.mark.slow
def test_resume_reproduces_straight_run(tiny_run_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(overrides(tiny_run_dir, straight, **{"trainer.total_steps": 4}))
    main(overrides(tiny_run_dir, resumed, **{"trainer.total_steps": 2}))
    main(overrides(tiny_run_dir, resumed, **{"trainer.total_steps": 4}))
    a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(b) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        for k, v in a[step].items():
            if k.startswith(VOLATILE) or k.startswith("val/"):
                continue
            assert b[step][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (step, k)


@pytest.mark.slow
def test_dapo_and_accumulation_run(tiny_run_dir, tmp_path):
    """Baseline loss plus micro-batching: 4 micro-batches of 2 rows in the mini-batch of 8 give
    the loss and gradient of one micro-batch of 8 (the same rollouts: micro_batch_size does not
    touch sampling), and at the first update the policy is the reference (KL 0)."""
    recs = {}
    for micro in (2, 8):
        out = tmp_path / f"dapo_{micro}"
        extra = {
            "algorithm.loss": "dapo",
            "trainer.total_steps": 1,
            "optim.mini_batch_size": 2,
            "optim.micro_batch_size": micro,
            "algorithm.use_kl_loss": True,
            "trainer.val_before_train": False,
        }
        main(overrides(tiny_run_dir, out, **extra))
        recs[micro] = read_metrics(out / "metrics.jsonl")[-1]
    acc, one = recs[2], recs[8]
    assert acc["train/reward_mean"] == one["train/reward_mean"]  # the same rollouts
    assert abs(acc["train/loss"]) > 1e-4  # a real loss, not a trivially equal zero
    assert acc["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5, abs=1e-7)
    assert acc["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-4)
    assert acc["train/grad_norm"] > 0
    assert 0 <= acc["train/kl_loss"] < 1e-6


@pytest.mark.slow
def test_resumed_run_prints_resumed_from(tiny_run_dir, tmp_path):
    """The trainer's own INFO lines show in a real process, where importing orbax installs a
    logging handler before the trainer configures logging (they used to be dropped)."""
    out = tmp_path / "run"

    def run(steps):
        argv = overrides(tiny_run_dir, out, **{"trainer.total_steps": steps})
        proc = subprocess.run(
            [sys.executable, "-m", "htpo_jax.train", *argv],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    assert "resumed from" not in run(1)
    assert f"resumed from {out / 'checkpoints'} at step 1" in run(2)


@pytest.mark.parametrize(
    "arg,needle",
    [
        ("algorithm.loss=ppo", "algorithm.loss"),
        ("optim.lr=1e-6", "optim.learning_rate"),
    ],
)
def test_bad_config_exits_2_with_one_line(arg, needle):
    out = subprocess.run(
        [sys.executable, "-m", "htpo_jax.train", "--set", arg],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_config_yaml_written_is_loadable(tiny_run_dir, tmp_path):
    out = tmp_path / "cfgcheck"
    main(overrides(tiny_run_dir, out, **{"trainer.total_steps": 1, "checkpoint.save_every": 0}))
    cfg = load_config(out / "config.yaml")
    assert cfg.trainer.total_steps == 1
    assert json.loads(json.dumps(cfg.to_dict()))["rollout"]["n"] == 4


def fake_scored(acc_groups, g, width=4, r=5):
    """A Scored round with the given per-prompt correctness patterns ([P, G] bools)."""
    from htpo_jax.rl.sample import Scored

    acc = np.asarray(acc_groups, bool).reshape(-1)
    p = len(acc_groups)
    return Scored(
        prompt_ids=np.arange(p * width).reshape(p, width).astype(np.int32),
        prompt_mask=np.ones((p, width), np.int32),
        tokens=np.tile(np.arange(p * g)[:, None], (1, r)).astype(np.int32),
        response_mask=np.ones((p * g, r), np.int32),
        lengths=np.full(p * g, r),
        finished=np.ones(p * g, bool),
        reward=np.where(acc, 1.0, -1.0).astype(np.float32),
        score=np.where(acc, 1.0, -1.0).astype(np.float32),
        acc=acc,
        n=g,
    )


def test_dynamic_sampling_keeps_mixed_groups_and_draws_more(monkeypatch):
    import htpo_jax.run.stages as S

    cfg = load_config(
        None,
        [
            "rollout.n=2",
            "data.train_batch_size=3",
            "data.gen_batch_size=2",
            "optim.mini_batch_size=1",
            "optim.micro_batch_size=2",
        ],
    )
    rounds = iter(
        [
            [[1, 1], [1, 0]],  # keeps prompt 1 only
            [[0, 0], [0, 0]],  # keeps nothing
            [[0, 1], [1, 0]],  # keeps both: 3 kept, done
        ]
    )
    monkeypatch.setattr(
        S, "sample_round", lambda p, s, cfg, params, key, n, v=0: fake_scored(next(rounds), 2)
    )
    s = type("S", (), {"sync": dist.HostSync("test")})()
    kept, stats = S.collect(None, s, cfg, None, jax.random.key(0))
    assert stats["filter/gen_batches"] == 3
    assert stats["filter/kept_prompt_frac"] == pytest.approx(3 / 6)
    np.testing.assert_array_equal(kept.acc, [1, 0, 0, 1, 1, 0])
    # the kept rows are those of round 0 prompt 1, then round 2 prompts 0 and 1
    np.testing.assert_array_equal(kept.tokens[:, 0], [2, 3, 0, 1, 2, 3])
    assert stats["train/accuracy"] == pytest.approx(5 / 12)

    rounds = iter([[[1, 1], [0, 0]]] * 10)
    monkeypatch.setattr(
        S, "sample_round", lambda p, s, cfg, params, key, n, v=0: fake_scored(next(rounds), 2)
    )
    with pytest.raises(S.SamplingExhausted, match="max_num_gen_batches"):
        S.collect(None, s, cfg, None, jax.random.key(0))


# ---------------------------------------------------------------- start-up stops, a done run
def _complete_run(root: Path, out: Path, total: int):
    """A run dir as a finished run leaves it: config.yaml and checkpoint `total` (no training)."""
    from flax import nnx

    from htpo_jax.models.hf_io import from_pretrained
    from htpo_jax.rl.train_step import TrainState, make_optimizer
    from htpo_jax.run.checkpoint import Checkpointer

    argv = overrides(root, out, **{"trainer.total_steps": total})
    from htpo_jax.run.train import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, argv[1:])  # what main reads when no --config is given
    _, params = nnx.split(from_pretrained(cfg.model.path, dtype=jnp.float32))
    tx = make_optimizer(cfg.optim, cfg.trainer.total_steps, 2)
    state = TrainState.create(params, tx, seed=1, step=total)
    extra = {"config": cfg.to_dict(), "data": {"epoch": 0, "index": 0}, "run_id": "done"}
    with Checkpointer(out / "checkpoints", async_save=False) as ckpt:
        ckpt.save(total, state, extra)
    return argv


def test_a_complete_run_says_so_and_does_nothing(tiny_run_dir, tmp_path, capsys, monkeypatch):
    """Before: `val/accuracy: n/a (start) -> n/a (after step 2)`, as if something had run."""
    import htpo_jax.run.train as T

    out = tmp_path / "done"
    argv = _complete_run(tiny_run_dir, out, 2)
    monkeypatch.setattr(T, "rl_step", lambda *a: pytest.fail("a complete run stepped"))
    monkeypatch.setattr(T, "run_validation", lambda *a: pytest.fail("a complete run validated"))
    summary = main(argv)
    stdout = capsys.readouterr().out.strip().splitlines()
    assert summary["already_complete"] and summary["steps"] == 2
    assert stdout == [
        f"run already complete at step 2 (trainer.total_steps reached; checkpoints in "
        f"{out / 'checkpoints'}): nothing to do; raise trainer.total_steps to train on, or use a "
        "new trainer.output_dir"
    ], stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]  # locks released


def test_sigint_during_start_up_says_so_at_once_and_runs_no_step(
    tiny_run_dir, tmp_path, capsys, monkeypatch
):
    """Before: nothing said what happens (the handler's line promised a save "at the end of this
    step") while the run went on through validation and step 1 to a save."""
    import os
    import signal

    import htpo_jax.run.train as T

    load = T.build_model
    said = []

    def load_then_interrupt(*a, **k):
        model = load(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the run is still starting
        said.append(capsys.readouterr().err)  # what the user has seen right after it
        return model

    monkeypatch.setattr(T, "build_model", load_then_interrupt)
    monkeypatch.setattr(T, "rl_step", lambda *a: pytest.fail("a step ran after the stop"))
    monkeypatch.setattr(T, "run_validation", lambda *a: pytest.fail("validated after the stop"))
    out = tmp_path / "run"
    # the handler before the run: Python's default, or SIG_IGN in a pytest-xdist worker
    before = signal.getsignal(signal.SIGINT)
    summary = main(overrides(tiny_run_dir, out, **{"trainer.val_before_train": True}))
    assert said[0].strip().splitlines()[-1] == (
        "SIGINT received during start-up: stopping before the first step (nothing new to save); "
        "SIGINT again stops at once"
    ), said
    assert summary["stopped"] == "SIGINT" and summary["saved"] is False and summary["steps"] == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert stdout == [
        "stopped during start-up (SIGINT): no step run, nothing saved; run the same command to "
        "start it"
    ], stdout
    assert not any(p.name.isdigit() for p in (out / "checkpoints").glob("*"))
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
