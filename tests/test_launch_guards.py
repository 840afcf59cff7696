"""`train.main` and `export` refuse bad launches with one line (exit 2) before the model loads or
anything is written, and stop a diverged run without leaving a non-finite checkpoint (issue 12)."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import make_state, overrides

from htpo_jax.run import lock, watch
from htpo_jax.run import train as T
from htpo_jax.run.checkpoint import Checkpointer
from htpo_jax.run.config import dump_yaml, load_config


def run_main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1] if err else ""


def no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the launch was validated")

    monkeypatch.setattr(T, "build_model", fail)


def test_resume_false_on_a_used_dir_refuses(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with Checkpointer(out / "checkpoints", async_save=False) as ckpt:
        ckpt.save(3, make_state(1))
    code, line = run_main(overrides(tiny_run_dir, out, **{"checkpoint.resume": False}), capsys)
    assert code == 2
    assert line.startswith("error: checkpoint.resume=false but") and "[3]" in line
    assert not (out / "config.yaml").exists()  # nothing written by a launch that failed
    assert not (out / lock.LOCK_NAME).exists()  # and the lock released


def _foreign_checkpoint(out, extra):
    with Checkpointer(out / "checkpoints", async_save=False) as ckpt:
        ckpt.save(2, make_state(1), extra)


def test_config_drift_on_resume_refuses_listing_keys(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = overrides(tiny_run_dir, out)
    old = load_config(None, [*argv[1:], "optim.learning_rate=5e-3", "trainer.seed=9"])
    _foreign_checkpoint(out, {"config": old.to_dict(), "param_shapes": {}})
    (out / "config.yaml").write_text("the old run's\n")
    code, line = run_main(argv, capsys)
    assert code == 2
    assert "optim.learning_rate: 0.005 -> 0.001" in line and "trainer.seed: 9 -> 1" in line
    assert "checkpoint.allow_config_change=true" in line
    assert (out / "config.yaml").read_text() == "the old run's\n"  # not overwritten


def test_another_model_on_resume_is_one_line(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _foreign_checkpoint(out, {"param_shapes": {"['embed_tokens']": [7, 3]}})
    code, line = run_main(overrides(tiny_run_dir, out), capsys)
    assert code == 2 and "written for another model" in line and "[7, 3]" in line, line


@pytest.mark.parametrize("missing", ["dir", "config.json", "safetensors", "tokenizer"])
def test_bad_model_dir_is_one_line_before_loading(
    tiny_run_dir, tmp_path, capsys, monkeypatch, missing
):
    model = tmp_path / "model"
    if missing != "dir":
        shutil.copytree(tiny_run_dir / "model", model)
        drop = {
            "config.json": ["config.json"],
            "safetensors": [p.name for p in model.glob("*.safetensors")],
            "tokenizer": [p.name for p in model.iterdir() if p.name.startswith("tokenizer")],
        }[missing]
        for name in drop:
            (model / name).unlink()
    no_model_load(monkeypatch)
    out = tmp_path / "run"
    code, line = run_main(overrides(tiny_run_dir, out, **{"model.path": str(model)}), capsys)
    assert code == 2 and line.startswith("error: model.path: ") and str(model) in line, line
    assert "huggingface" not in line.lower()
    assert not out.exists()


@pytest.mark.parametrize("content", [b"PAR1 garbage", b""])
def test_bad_data_file_exits_2_before_the_model_loads(
    tiny_run_dir, tmp_path, capsys, monkeypatch, content
):
    bad = tmp_path / "train.parquet"
    bad.write_bytes(content)
    no_model_load(monkeypatch)
    out = tmp_path / "run"
    code, line = run_main(overrides(tiny_run_dir, out, **{"data.train_files": str(bad)}), capsys)
    assert code == 2 and line.startswith("error: ") and "train.parquet" in line, line
    code, line = run_main(
        overrides(tiny_run_dir, out, **{"data.train_files": str(tmp_path / "none.jsonl")}), capsys
    )
    assert code == 2 and "data.train_files: data file not found" in line


def test_second_trainer_on_one_dir_is_refused(tiny_run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held = {"pid": holder.pid, "host": __import__("socket").gethostname(), "time": 0}
        (out / lock.LOCK_NAME).write_text(json.dumps(held))
        code, line = run_main(overrides(tiny_run_dir, out), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"pid {holder.pid}" in line and "in use by another trainer" in line


# ---------------------------------------------------------------- export
def _run_with_checkpoint(tiny_run_dir, tmp_path, poison: bool):
    """A run dir as train leaves it (config.yaml + checkpoints/1), without training."""
    from htpo_jax.models.hf_io import from_pretrained
    from htpo_jax.rl.train_step import TrainState, make_optimizer

    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_run_dir, out)[1:])
    out.mkdir()
    (out / "config.yaml").write_text(dump_yaml(cfg))
    from flax import nnx

    _, params = nnx.split(from_pretrained(cfg.model.path, dtype=jnp.float32))
    if poison:
        params = jax.tree.map(lambda x: x * jnp.nan, params)
    tx = make_optimizer(cfg.optim, 1)
    state = TrainState.create(params, tx)
    with Checkpointer(out / "checkpoints", async_save=False) as ckpt:
        ckpt.save(1, state, {"config": cfg.to_dict()})
    return out


def test_export_refuses_nonfinite_weights(tiny_run_dir, tmp_path, capsys):
    from htpo_jax.tools.export import main as export_main

    run = _run_with_checkpoint(tiny_run_dir, tmp_path, poison=True)
    with pytest.raises(SystemExit) as e:
        export_main(["--run", str(run), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "non-finite" in err, err
    assert not (tmp_path / "hf").exists()


def test_export_works_from_another_directory(tiny_run_dir, tmp_path, monkeypatch):
    from htpo_jax.tools.export import export

    _run_with_checkpoint(tiny_run_dir, tmp_path, poison=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert export("../run", "hf") == 1
    assert (elsewhere / "hf" / "config.json").is_file()


# ---------------------------------------------------------------- divergence, end to end
@pytest.mark.slow
def test_nan_recipe_stops_with_one_line_and_only_finite_checkpoints(tiny_run_dir, tmp_path, capsys):
    """The issue's recipe: near-zero temperature, no warmup, no dynamic sampling -> NaN at step 1.
    Before: every parameter NaN, exit 0, NaN checkpoints rotating the good ones out."""
    out = tmp_path / "run"
    argv = overrides(
        tiny_run_dir,
        out,
        **{
            "rollout.temperature": 1e-30,
            "trainer.total_steps": 4,
            "trainer.max_nonfinite_steps": 2,
        },
    )
    code, line = run_main(argv, capsys)
    assert code == 1 and line.startswith("error: stopped at step"), line
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:  # whatever was written is finite
        tree = ocp.StandardCheckpointer().restore(out / "checkpoints" / str(step) / "state")
        assert watch.all_finite(tree["params"]), step
    from htpo_jax.tools.export import main as export_main

    if steps:
        export_main(["--run", str(out), "--out", str(tmp_path / "hf")])
    else:  # nothing finite to export: one line, exit 2
        with pytest.raises(SystemExit) as e:
            export_main(["--run", str(out), "--out", str(tmp_path / "hf")])
        assert e.value.code == 2


# ---------------------------------------------------------------- run directories (issue 20 item 6)
def test_a_checkpoint_dir_in_use_by_another_run_is_refused(tiny_run_dir, tmp_path, capsys):
    """Before: two runs with their own output_dir and one checkpoint.dir both wrote there."""
    shared = tmp_path / "shared_ckpts"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        shared.mkdir()
        held = {"pid": holder.pid, "host": __import__("socket").gethostname(), "time": 0}
        (shared / lock.LOCK_NAME).write_text(json.dumps(held))
        out = tmp_path / "run_b"
        argv = overrides(tiny_run_dir, out, **{"checkpoint.dir": str(shared)})
        code, line = run_main(argv, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"pid {holder.pid}" in line and "use another checkpoint.dir" in line, line
    assert not (out / lock.LOCK_NAME).exists()  # run B's own lock released on the way out
    assert not any(p.name.isdigit() for p in shared.iterdir())


def test_one_run_holds_its_output_and_checkpoint_locks(tiny_run_dir, tmp_path, monkeypatch):
    """The lock file in a checkpoint dir is invisible to Orbax (steps, restore, cleanup)."""
    out, ckpts = tmp_path / "run", tmp_path / "ckpts"
    seen = {}

    def loop(c, state, stops):
        seen["locks"] = sorted(p.parent.name for p in (out, ckpts) for p in p.glob(lock.LOCK_NAME))
        ckpt = c.services.ckpt
        ckpt.save(1, state, {"step": 1})
        ckpt.wait()
        seen["steps"] = ckpt.all_steps()
        none = dict.fromkeys(("val_accuracy_before", "val_accuracy_after", "stopped", "metrics"))
        return {**none, "steps": 1, "checkpoints": str(ckpts), "last": {}}

    monkeypatch.setattr(T, "run_loop", loop)
    T.main(overrides(tiny_run_dir, out, **{"checkpoint.dir": str(ckpts)}))
    assert seen == {"locks": ["ckpts", "run"], "steps": [1]}
    assert not (out / lock.LOCK_NAME).exists() and not (ckpts / lock.LOCK_NAME).exists()
    with Checkpointer(ckpts) as ckpt:
        assert ckpt.all_steps() == [1] and (ckpts / "1").is_dir()


@pytest.mark.parametrize("which", ["checkpoint.dir", "trainer.output_dir"])
def test_a_run_dir_that_is_a_file_exits_2_before_the_model_loads(
    tiny_run_dir, tmp_path, capsys, monkeypatch, which
):
    """Before: checkpoint.dir as a file trained, then failed at the first save; an output_dir
    that cannot be made was a traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    no_model_load(monkeypatch)
    out = tmp_path / "run"
    target = blocker if which == "checkpoint.dir" else blocker / "run"
    code, line = run_main(overrides(tiny_run_dir, out, **{which: str(target)}), capsys)
    assert code == 2 and line.startswith(f"error: {which}: ") and "is a file" in line, line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs /proc")
def test_an_unwritable_output_dir_exits_2_with_one_line(tiny_run_dir, capsys, monkeypatch):
    """/proc refuses new files even to root (a read-only mode would not stop root)."""
    no_model_load(monkeypatch)
    code, line = run_main(overrides(tiny_run_dir, "/proc/htpo_run"), capsys)
    assert code == 2 and line.startswith("error: trainer.output_dir: cannot write to"), line


@pytest.mark.parametrize("change", ["gpt2", "yarn"])
def test_a_model_the_decoder_cannot_run_exits_2_before_loading(
    tiny_run_dir, tmp_path, capsys, monkeypatch, change
):
    """Before: a ValueError traceback from ModelConfig at the model load (issue 20 item 8)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_run_dir / "model", model)
    config = json.loads((model / "config.json").read_text())
    if change == "gpt2":
        config["model_type"] = "gpt2"
    else:
        config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (model / "config.json").write_text(json.dumps(config))
    no_model_load(monkeypatch)
    code, line = run_main(
        overrides(tiny_run_dir, tmp_path / "run", **{"model.path": model}), capsys
    )
    assert code == 2 and line.startswith(f"error: model.path: {model}") and change in line, line


def test_export_of_a_run_without_checkpoint_is_one_line_and_leaves_nothing(tiny_run_dir, tmp_path):
    """Before: the right line, then ~40 lines of Orbax's shutdown traceback (its temp-dir
    cleanup thread outlived the exit), and an empty checkpoints/ made in the run dir."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(None, overrides(tiny_run_dir, out)[1:])
    (out / "config.yaml").write_text(dump_yaml(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "htpo_jax.export", "--run", str(out), "--out", str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
    )
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and lines == [f"export: no checkpoint in {out / 'checkpoints'}"], (
        proc.stderr
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    assert not (tmp_path / "hf").exists()
