"""step_time: the step model over the engine's real scheduler (no compile, no device)."""

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
