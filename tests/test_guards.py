"""Run guards (issue 12), each test reproducing a failure a user hit: lock, run mixing, config
drift, non-finite updates, collapse, bad paths, truncated metrics, corrupt / foreign checkpoints,
failed background saves, slow rewards, config paths and values."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_state
from tiny_models import hf_config_dict

from htpo_jax.run import lock, preflight, resume_checks, watch
from htpo_jax.run.checkpoint import Checkpointer, CheckpointMismatch, CheckpointSaveError
from htpo_jax.run.config import ConfigError, load_config
from htpo_jax.run.metrics import MetricsLogger, read_metrics

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- lock
def _write_lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / lock.LOCK_NAME).write_text(
        json.dumps({"pid": pid, "host": host or socket.gethostname(), "time": 0})
    )


def test_lock_refuses_a_second_trainer_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, holder.pid)
        with pytest.raises(
            preflight.LaunchError, match=f"in use by another trainer \\(pid {holder.pid}"
        ):
            lock.OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_lock_from_another_host_is_refused(tmp_path):
    _write_lock(tmp_path, 1, host="some-other-host")
    with pytest.raises(preflight.LaunchError, match="some-other-host"):
        lock.OutputLock(tmp_path).acquire()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    with caplog.at_level(logging.WARNING, "htpo_jax.run.lock"):
        held = lock.OutputLock(tmp_path).acquire()
    assert f"stale lock {tmp_path / lock.LOCK_NAME} of pid {dead.pid}" in caplog.text
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    held.release()
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_remote_output_dir_is_not_locked():
    held = lock.OutputLock("gs://bucket/run").acquire()  # no local file for a URL
    assert held.path is None


# ---------------------------------------------------------------- run mixing and config drift
def test_resume_false_refuses_a_used_checkpoint_dir(tmp_path):
    with pytest.raises(
        preflight.LaunchError, match=r"resume=false but .* holds checkpoints .*\[2, 4\]"
    ):
        resume_checks.check_fresh_start(str(tmp_path), [2, 4])
    resume_checks.check_fresh_start(str(tmp_path), [])  # an empty dir is fine


def test_config_drift_lists_the_keys_that_change_results():
    old = load_config(overrides=["trainer.output_dir=/x"]).to_dict()
    new = load_config(
        overrides=[
            "optim.learning_rate=3e-6",
            "trainer.seed=7",
            "model.dtype=float32",
            "algorithm.loss=dapo",
            "trainer.output_dir=/y",  # where and how long do not change results
            "trainer.total_steps=5",
            "optim.warmup_steps=0",
            "mesh.data=2",
            "mesh.fsdp=1",
            "checkpoint.save_every=1",
            "rollout.val_n=4",
        ]
    ).to_dict()
    drift = resume_checks.config_drift(old, new)
    keys = [d.split(":")[0] for d in drift]
    assert keys == [
        "algorithm.loss",
        "model.dtype",
        "optim.learning_rate",
        "optim.warmup_steps",
        "trainer.seed",
    ]
    with pytest.raises(preflight.LaunchError, match="optim.learning_rate: 1e-06 -> 3e-06"):
        resume_checks.check_drift(old, new, allow=False, step=4)
    resume_checks.check_drift(old, new, allow=True, step=4)  # allowed: a warning only
    resume_checks.check_drift(old, old, allow=False, step=4)


# ---------------------------------------------------------------- paths
def test_model_dir_problems_are_one_line(tmp_path):
    with pytest.raises(preflight.LaunchError, match="model.path: .*nope is not a directory"):
        preflight.check_model_dir(str(tmp_path / "nope"))
    with pytest.raises(preflight.LaunchError, match="model.path is empty"):
        preflight.check_model_dir("")
    with pytest.raises(preflight.LaunchError, match="no config.json"):
        preflight.check_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict("qwen3", False)))
    with pytest.raises(preflight.LaunchError, match="no \\*.safetensors"):
        preflight.check_model_dir(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    preflight.check_model_dir(str(tmp_path))
    with pytest.raises(preflight.LaunchError, match="no tokenizer files"):
        preflight.check_model_dir(str(tmp_path), tokenizer=True)
    with pytest.raises(preflight.LaunchError, match="Qwen/Qwen3-0.6B is not a directory"):
        preflight.check_model_dir("Qwen/Qwen3-0.6B")  # a hub id: never downloaded, one line


def test_relative_config_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "run.yaml").write_text(
        "model: {path: ../models/m}\n"
        "data: {train_files: [d/train.jsonl, /abs/x.jsonl], val_files: [gs://b/val.parquet]}\n"
        "trainer: {output_dir: runs/r}\n"
    )
    monkeypatch.chdir(REPO)  # anywhere but the config's directory
    c = load_config(conf / "run.yaml", ["checkpoint.dir=ck"])
    assert c.model.path == str(conf / "../models/m")
    assert c.data.train_files == (str(conf / "d/train.jsonl"), "/abs/x.jsonl")
    assert c.data.val_files == ("gs://b/val.parquet",)  # URLs are left alone
    assert c.trainer.output_dir == str(conf / "runs/r")
    assert c.checkpoint.dir == str(REPO / "ck")  # --set: relative to the working directory


def test_default_config_works_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config(REPO / "configs" / "default.yaml")
    assert Path(c.model.path, "config.json").is_file()
    assert all(Path(f).is_file() for f in (*c.data.train_files, *c.data.val_files))
    assert Path(c.trainer.output_dir).resolve() == REPO / "runs" / "default"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("rollout.temperature=.inf", "rollout.temperature: must be a finite number"),
        ("optim.learning_rate=.inf", "optim.learning_rate: must be a finite number"),
        ("optim.learning_rate=.nan", "optim.learning_rate: must be a finite number"),
        ("trainer.output_dir=", "trainer.output_dir: must not be empty"),
    ],
)
def test_infinite_values_and_empty_output_dir_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[override])


# ---------------------------------------------------------------- non-finite and collapse
def test_nonfinite_watch_stops_after_k_in_a_row():
    w = watch.NonFiniteWatch(limit=2)
    w.check(1, {"train/loss": float("nan"), "train/grad_norm": 1.0})
    w.check(2, {"train/loss": 0.1, "train/grad_norm": 1.0})  # a finite step resets the count
    w.check(3, {"train/loss": 0.1, "train/nonfinite_skipped": 1.0})
    with pytest.raises(watch.TrainingStopped, match="stopped at step 4: 2 RL step"):
        w.check(4, {"train/loss": 0.1, "train/grad_norm": float("inf")})
    watch.NonFiniteWatch(limit=0).check(1, {"train/loss": float("nan")})  # 0: never stops


def test_collapse_warnings_name_the_metric(caplog):
    w = watch.CollapseWatch(vocab_size=100, window=3, dynamic_sampling=False)
    with caplog.at_level(logging.WARNING, "htpo_jax.run.watch"):
        assert w.check(1, {"train/entropy": 1.0, "train/accuracy": 0.0}) == []
        assert w.check(2, {"train/entropy": 4.5, "train/accuracy": 0.0})  # log(100) = 4.6
        said = w.check(3, {"train/entropy": 1.0, "train/accuracy": 0.0})
    assert "train/accuracy has been 0 for 3 steps" in said[0]
    assert "train/entropy 4.500 is at its maximum" in caplog.text
    with_ds = watch.CollapseWatch(vocab_size=100, window=1, dynamic_sampling=True)
    assert with_ds.check(1, {"train/accuracy": 0.0}) == []  # dynamic sampling: acc is filtered


def test_all_finite():
    assert watch.all_finite({"a": jnp.ones(3), "i": jnp.arange(3)})
    assert not watch.all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])})
    assert not watch.all_finite([jnp.array([jnp.inf], jnp.bfloat16)])


class _FakeCkpt:
    def __init__(self):
        self.saved, self.closed = [], False

    def all_steps(self):
        return [1]

    def save(self, step, state, extra):
        self.saved.append(step)

    def close(self):
        self.closed = True

    def check(self):
        pass


def test_a_nonfinite_checkpoint_is_never_written():
    cfg = load_config(overrides=["trainer.output_dir=/x"])
    step_watch, ckpt = watch.StepWatch(cfg, vocab_size=10), _FakeCkpt()

    class S:
        params = {"w": jnp.array([1.0, jnp.nan])}

    with pytest.raises(watch.TrainingStopped, match="checkpoint 2 was not written.*kept: \\[1\\]"):
        step_watch.save(2, S, {}, ckpt)
    assert ckpt.saved == [] and ckpt.closed


# ---------------------------------------------------------------- metrics
def test_truncated_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')  # disk full
    with caplog.at_level(logging.WARNING, "htpo_jax.run.metrics"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
        MetricsLogger(tmp_path, resume_step=2)
    assert f"{path}: dropping the truncated last line 3" in caplog.text
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not a JSON object"):
        read_metrics(path)


# ---------------------------------------------------------------- checkpoints
def _corrupt(step_dir: Path) -> None:
    """Truncate every file of the state item (what a full disk or a killed copy leaves)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    with Checkpointer(tmp_path, max_to_keep=3, async_save=False) as ckpt:
        ckpt.save(1, make_state(1), {"tag": "one"})
        ckpt.save(2, make_state(2), {"tag": "two"})
    _corrupt(tmp_path / "2")
    with caplog.at_level(logging.WARNING, "htpo_jax.run.checkpoint"):
        with Checkpointer(tmp_path) as ckpt:
            state, extra = ckpt.restore_latest(make_state(0))
    assert extra["tag"] == "one"
    np.testing.assert_array_equal(
        np.asarray(state["params"]["embed_vd"]), np.asarray(make_state(1)["params"]["embed_vd"])
    )
    assert "checkpoint 2 in" in caplog.text and "does not load" in caplog.text
    assert "resuming from checkpoint 1 instead of the newest, 2" in caplog.text


def test_missing_file_in_newest_and_verify_reject(tmp_path, caplog):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
        ckpt.save(2, make_state(2))
        ckpt.save(3, make_state(3))
    shutil.rmtree(tmp_path / "3" / "state")  # a missing item
    reject_2 = lambda s: "is rejected" if float(s["params"]["embed_vd"][0, 0]) == 2.0 else None
    with caplog.at_level(logging.WARNING, "htpo_jax.run.checkpoint"):
        with Checkpointer(tmp_path) as ckpt:
            _, extra = ckpt.restore_latest(make_state(0), verify=reject_2)
    assert extra["step"] == 1
    assert "checkpoint 2 in" in caplog.text and "is rejected" in caplog.text
    assert "(skipped: [3, 2])" in caplog.text


def test_no_loadable_checkpoint_is_one_line(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
    _corrupt(tmp_path / "1")
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(CheckpointMismatch, match="tried steps \\[1\\]"),
    ):
        ckpt.restore_latest(make_state(0))


def test_another_model_is_one_line_naming_the_parameter(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
    other = make_state(0)
    other["params"]["embed_vd"] = jnp.zeros((5, 3))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(
            CheckpointMismatch, match=r"\['embed_vd'\] has shape \[4, 3\] there and \[5, 3\]"
        ):
            ckpt.restore_latest(other)


def test_failed_background_save_surfaces_at_once_with_path_and_errno(tmp_path):
    root = tmp_path / "ck"
    ckpt = Checkpointer(root, async_save=True)
    ckpt.save(1, make_state(1))
    ckpt.wait()
    shutil.rmtree(root)
    root.write_text("not a directory")  # the mount went away / the disk is gone
    with pytest.raises(CheckpointSaveError) as e:
        ckpt.save(2, make_state(2))
        ckpt.check()
        ckpt.wait()
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg and "errno" in msg, msg
    ckpt.close()  # the error was reported once; closing does not hang


# ---------------------------------------------------------------- rewards
ADVERSARIAL = [
    ("Answer: 1", "1" * 30000, "dapo_math"),
    ("Answer: 1", "1" * 10_000_000, "dapo_math"),
    ("Answer: " + "\\text{" * 5000, "\\boxed{" * 5000, "dapo_math"),
    ("$10^{10^{10^{10}}}$", "1", "math_verify"),
]


@pytest.mark.parametrize("solution, truth, fn", ADVERSARIAL, ids=["30k", "10M", "macros", "tower"])
def test_adversarial_rewards_return_within_the_limit(solution, truth, fn):
    from htpo_jax.rewards.scoring import RewardPools, score_batch

    limit = 2.0
    with RewardPools() as pools:  # as a run scores: its pools outlive one call
        score_batch(["Answer: 0"], ["0"], fn=fn, timeout_s=limit, pools=pools)  # worker start-up
        t0 = time.perf_counter()
        out = score_batch([solution], [truth], fn=fn, timeout_s=limit, pools=pools)
        elapsed = time.perf_counter() - t0
    assert elapsed < limit + 1.0, elapsed
    assert not out.acc[0]
    if fn == "dapo_math":
        assert not out.timed_out[0]  # bounded normalization: done well within the limit
        assert elapsed < 1.0
    else:
        assert out.timed_out[0]  # sympy's C loop, stopped by killing the worker


def test_default_config_bounds_reward_time():
    assert load_config(REPO / "configs" / "default.yaml").algorithm.reward_timeout_s > 0
    assert load_config().algorithm.reward_timeout_s > 0


def test_trainer_info_lines_show_although_orbax_configured_logging(caplog):
    import orbax.checkpoint  # noqa: F401  (installs absl's handler on the root logger)

    logging.getLogger("htpo_jax").setLevel(logging.NOTSET)  # as before the trainer starts
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("htpo_jax.train").info("resumed from x at step 3")
    assert "resumed from" not in caplog.text  # the bug: INFO lines were never created
    preflight.setup_logging()
    logging.getLogger("htpo_jax.train").info("resumed from x at step 3")
    assert "resumed from x at step 3" in caplog.text


# ---------------------------------------------------------------- issue 20 items 6 and 8
def test_lock_of_a_checkpoint_dir_names_its_key(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, holder.pid)
        with pytest.raises(preflight.LaunchError, match="use another checkpoint.dir"):
            lock.OutputLock(tmp_path, key="checkpoint.dir").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(preflight.LaunchError, match="trainer.output_dir: cannot create .*file"):
        lock.OutputLock(tmp_path / "file" / "run").acquire()


@pytest.mark.parametrize(
    "kind",
    ["file", "under_a_file", "unwritable"] + (["proc"] if Path("/proc/self").exists() else []),
)
def test_unusable_run_dirs_are_one_line_and_leave_nothing(tmp_path, kind):
    where = tmp_path / "x"
    if kind == "file":
        where.write_text("")
        target, needle = where, "is a file, not a directory"
    elif kind == "under_a_file":
        where.write_text("")
        target, needle = where / "a" / "b", f"{where} is a file, not a directory"
    elif kind == "unwritable":
        where.mkdir()
        where.chmod(0o555)
        if os.access(where, os.W_OK):  # root: permission bits do not stop it
            where.chmod(0o755)
            pytest.skip("running as root: a read-only mode does not make a dir unwritable")
        target, needle = where / "run", "cannot write"
    else:
        target, needle = Path("/proc/htpo_run"), "cannot write"
    with pytest.raises(preflight.LaunchError) as e:
        preflight.check_writable_dir(str(target), "checkpoint.dir")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("checkpoint.dir: ") and needle in msg, msg
    if kind != "proc":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no probe file left
        if where.is_dir():
            assert list(where.iterdir()) == []
    preflight.check_writable_dir(str(tmp_path / "new" / "run"), "trainer.output_dir")
    assert not (tmp_path / "new").exists()  # checked, not created


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"model_type": "gpt2", "n_embd": 8}, "model_type='gpt2' in config.json is not supported"),
        (
            {**hf_config_dict("qwen3", False), "rope_parameters": None,
             "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "rope_type='yarn' is not supported",
        ),
        ("{not json", "config.json is not valid JSON"),
        ({"model_type": "qwen3"}, "config.json lacks 'num_attention_heads'"),
    ],
)  # fmt: skip
def test_a_model_the_decoder_cannot_run_is_one_line(tmp_path, config, needle):
    """Before: train and evaluate raised a ValueError / KeyError traceback at the model load."""
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(preflight.LaunchError) as e:
        preflight.check_model_dir(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.path: {tmp_path}") and needle in msg, msg
