"""step_time: the step model over the engine's real scheduler (no compile, no device)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from htpo_jax.tools import step_time


def run(tmp_path, *extra):
    out = tmp_path / f"est{len(list(tmp_path.iterdir()))}.json"
    assert step_time.main(["--topology", "v5p-8", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_stage_sums_and_longer_lengths_cost_more(tmp_path, capsys):
    est = run(tmp_path)  # the default config's synthetic lengths
    assert est["total_seconds"] == pytest.approx(sum(est["seconds"].values()))
    assert sum(est["share"].values()) == pytest.approx(1.0)
    assert set(est["seconds"]) == set(step_time.STAGES)
    for stage, ratio in est["floor_ratio"].items():
        assert ratio >= 0.999, stage  # nothing beats the floor
    assert "| decode |" in capsys.readouterr().out
    n = est["responses"]
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("\n".join(["4"] * n))
    long.write_text(json.dumps([64] * n))
    a, b = run(tmp_path, "--lengths", str(short)), run(tmp_path, "--lengths", str(long))
    assert b["mean_length"] == 64 and a["mean_length"] == 4
    assert b["seconds"]["decode"] > a["seconds"]["decode"]
    for stage in ("old_log_prob", "update"):  # tiny model: the FSDP gathers may bound both
        assert b["seconds"][stage] >= a["seconds"][stage], stage
        assert b["floor_seconds"][stage] > a["floor_seconds"][stage], stage
    assert b["total_seconds"] > a["total_seconds"]
    two = run(tmp_path, "--lengths", str(long), "--gen-rounds", "2")
    assert two["seconds"]["decode"] == pytest.approx(2 * b["seconds"]["decode"])
    assert two["seconds"]["update"] == pytest.approx(b["seconds"]["update"])


def test_cpu_devices_and_bad_lengths_are_one_line(tmp_path, capsys):
    assert step_time.main(["--topology", "cpu:4"]) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("0 3")
    assert step_time.main(["--topology", "v5p-8", "--lengths", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("step_time:") == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_scanned_estimate_matches_unrolled_on_tpu(tmp_path):
    """The trip-count scaling: XLA counts a scanned layer once; the estimate puts the layers
    back and must match the unrolled program's own count (small model, v5p-8)."""
    out = {}
    for scan in ("true", "false"):
        path = tmp_path / f"{scan}.json"
        args = ["--topology", "v5p-8", "--programs", "update", "--num-layers", "4",
                "--set", f"model.scan_layers={scan}", "--time", "--json", str(path)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        proc = subprocess.run([sys.executable, "-m", "htpo_jax.compile_check", *args], env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[scan] = json.loads(path.read_text())["programs"][0]
    # Both sides add the Pallas kernels' FLOPs from shapes; the unrolled side is not rescaled.
    est, unrolled = out["true"]["time"], out["false"]["time"]
    assert "x4 layers" in est["notes"] and "layers" not in unrolled["notes"]
    for key in ("flops", "bytes_accessed", "compiler_seconds"):
        assert est[key] == pytest.approx(unrolled[key], rel=0.10), key


def test_compiled_figures_replace_the_roofline_where_given(tmp_path, capsys):
    """--compiled: a stage whose program the compile_check report holds is costed at the
    compiler's figure and says so; the others stay roofline; a report of another target is
    one line."""
    base = run(tmp_path)
    from htpo_jax.models.model_config import ModelConfig
    from htpo_jax.run.config import load_config
    from htpo_jax.tools.compile_programs import model_config_path

    cfg = load_config(str(step_time.DEFAULT_CONFIG))
    layers = ModelConfig.from_pretrained(model_config_path(cfg, None).parent).num_layers
    adamw = {"program": "optimizer", "shape": "AdamW step",
             "time": {"seconds": 2 * base["floor_seconds"]["optimizer"]}}  # fmt: skip
    report = tmp_path / "compiled.json"
    report.write_text(json.dumps({"target": "v5p-8", "num_layers": layers, "programs": [adamw]}))
    est = run(tmp_path, "--compiled", str(report))
    assert est["seconds"]["optimizer"] == pytest.approx(2 * base["seconds"]["optimizer"])
    assert est["source"]["optimizer"].startswith("compiler x2.00 (optimizer")
    assert est["seconds"]["decode"] == base["seconds"]["decode"]
    assert {est["source"][s] for s in step_time.STAGES if s != "optimizer"} == {"roofline"}
    assert "| compiler x2.00" in capsys.readouterr().out
    report.write_text(json.dumps({"target": "v5p-64", "num_layers": layers, "programs": []}))
    assert step_time.main(["--topology", "v5p-8", "--compiled", str(report)]) == 2
    assert "--compiled: report is for v5p-64" in capsys.readouterr().err


def test_async_modes_table_and_properties(tmp_path, capsys):
    """--async-modes: the sync figures are the plain estimate's, bit for bit; every separate
    split covers the chips; a step is the longer of its concurrent parts plus the weight sync;
    the stream's rollout is no slower than the drained one_step's at the same split; the best
    split of each mode is the argmin of the listed ones."""
    plain = run(tmp_path)
    capsys.readouterr()
    est = run(tmp_path, "--async-modes")
    a = est.pop("async")
    assert est == plain  # the default figures do not move with the option
    out = capsys.readouterr().out
    assert "| mode | rollout chips | trainer chips |" in out and "balanced bound" in out
    assert a["splits"] == [1, 2, 3]  # v5p-8: one host of 4 chips
    (sync,) = [row for row in a["rows"] if row["mode"] == "sync"]
    assert sync["step_seconds"] == plain["total_seconds"] and sync["ratio"] == 1.0
    assert sync["rollout_seconds"] + sync["train_seconds"] == pytest.approx(sync["step_seconds"])
    by = {}
    for row in a["rows"]:
        by[row["mode"], row["rollout_chips"]] = row
        if row["mode"] == "sync":
            continue
        assert row["rollout_chips"] + row["trainer_chips"] == 4
        parts = max(row["rollout_seconds"], row["train_seconds"])
        assert row["step_seconds"] >= parts
        assert row["step_seconds"] == pytest.approx(parts + row["weight_sync_seconds"])
        assert row["ratio"] == pytest.approx(row["step_seconds"] / plain["total_seconds"])
    for split in a["splits"]:
        stream, one = by["stream", split], by["one_step", split]
        assert stream["rollout_seconds"] <= one["rollout_seconds"], split
        assert stream["decode_seconds"] <= one["decode_seconds"], split
        assert stream["rollout_floor_seconds"] == one["rollout_floor_seconds"]
    for mode in ("one_step", "stream"):
        rows = [by[mode, split] for split in a["splits"]]
        best = min(rows, key=lambda row: row["step_seconds"])
        assert a["best"][mode] == best and [r["best"] for r in rows].count(True) == 1
    # fewer rollout chips: a longer rollout, a shorter training
    assert by["one_step", 1]["rollout_seconds"] > by["one_step", 3]["rollout_seconds"]
    assert by["one_step", 1]["train_seconds"] < by["one_step", 3]["train_seconds"]
    assert step_time.main(["--topology", "v5p-8", "--async-modes", "--stream-steps", "2"]) == 2
    assert "--stream-steps 2" in capsys.readouterr().err


def test_weight_sync_and_splits_by_hand():
    """Each rollout chip receives the whole model (compute dtype, split by tensor) over its ICI:
    1,000 params x 2 bytes / tensor 2 at 100 bytes/s = 10 s. Splits: every host gives 1 .. 3
    of its 4 chips (v5p), tensor dividing both sides; v5e-8 is one host of 8."""
    from htpo_jax.infra.topology import Peaks, resolve_target
    from htpo_jax.run.config import load_config

    shape = step_time.Shape(layers=1, matmul_params=800, params=1000, q_dim=1, kv_token_bytes=1)
    assert step_time.weight_sync_seconds(shape, 2, 2, Peaks(1.0, 1.0, 100.0)) == 10.0
    cfg = load_config(str(step_time.DEFAULT_CONFIG))
    mesh = lambda t: dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, tensor=t))
    splits = lambda c, topo: step_time.rollout_splits(c, resolve_target(topo, None, None))
    assert splits(cfg, "v5p-64") == [8, 16, 24]
    assert splits(mesh(16), "v5p-64") == [16]
    assert splits(cfg, "v5e-8") == list(range(1, 8))
    assert splits(cfg, "v6e-256") == [64, 128, 192]
    assert splits(cfg, "v5e-1") == []
    two = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=2, fsdp=2))
    sub = step_time.submesh(two)
    assert (sub.mesh.data, sub.mesh.fsdp) == (1, -1)
