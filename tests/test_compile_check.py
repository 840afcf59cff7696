"""compile_check: AOT-compiles the step's programs on fake CPU devices (and on a TPU topology when
libtpu is installed), prints the per-chip memory table and JSON, exits 1 naming what won't fit."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from htpo_jax.infra.topology import GiB, TargetError, resolve_target

ROOT = Path(__file__).resolve().parent.parent


# The programs of the default config, in compile_check's order (the update is the micro-batch
# gradient and the optimizer step, with fixed-size micro-batches as with token budgets).
EVERY_PROGRAM = [
    "rollout",
    "engine_decode",
    "engine_prefill",
    "old_log_prob",
    "update",
    "optimizer",
]


def run_tool(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "htpo_jax.compile_check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_targets():
    t = resolve_target("v5p-64", None, None)
    assert (t.chips, t.topology, t.hbm_bytes, t.accelerator_type) == (
        32,
        "v5p:2x4x4",
        95 * GiB,
        "v5p-64",
    )
    assert resolve_target("v5p-8", None, None).topology == "v5p:2x2x1"
    e = resolve_target("v5e-8", None, None)
    assert (e.topology, e.hbm_bytes, e.accelerator_type) == ("v5e:2x4", 16 * GiB, "v5litepod-8")
    assert resolve_target("v6e-8", None, 12.5).hbm_bytes == int(12.5 * GiB)
    # v4 counts TensorCores like v5p: v4-8 is 4 chips, v4-512 is 256; 32 GiB a chip
    v4 = resolve_target("v4-32", None, None)
    assert (v4.chips, v4.topology, v4.hbm_bytes, v4.accelerator_type) == (
        16,
        "v4:2x2x4",
        32 * GiB,
        "v4-32",
    )
    assert resolve_target("v4-8", None, None).chips == 4
    assert resolve_target("v4-512", None, None).topology == "v4:4x8x8"
    assert resolve_target(None, "cpu:4", 1).chips == 4
    for bad in ("v5p-63", "v9-8", "v5p", "tpu", "v4-7", "v4-1024"):
        with pytest.raises(TargetError, match="--topology"):
            resolve_target(bad, None, None)
    with pytest.raises(TargetError, match="cpu:N"):
        resolve_target(None, "gpu:2", None)


def test_default_config_on_four_cpu_devices(tmp_path):
    out = run_tool(
        "--devices", "cpu:4", "--programs", "old_log_prob", "--json", tmp_path / "r.json"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| old_log_prob | 128 x (64+64) |" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    (row,) = report["programs"]
    assert row["program"] == "old_log_prob" and row["fits"] and report["fits"]
    assert row["peak"] >= row["arguments"] + row["temporaries"] > 0 and row["flops"] > 0


def test_tiny_hbm_exits_1_naming_the_program():
    out = run_tool("--devices", "cpu:4", "--programs", "old_log_prob", "--hbm-gib", "1e-4")
    assert out.returncode == 1
    assert "does not fit: old_log_prob" in out.stderr
    assert "| NO |" in out.stdout


def test_bad_input_exits_2_with_one_line():
    out = run_tool("--topology", "v5p-63")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    out = run_tool("--devices", "cpu:3", "--set", "mesh.fsdp=2")
    assert out.returncode == 2 and "mesh" in out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_every_program_and_a_huge_shape(tmp_path):
    out = run_tool("--devices", "cpu:4", "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr[-2000:]
    names = [r["program"] for r in json.loads((tmp_path / "r.json").read_text())["programs"]]
    assert names == EVERY_PROGRAM
    # 64 responses of 64k tokens per micro-batch with full attention: the update cannot fit 8 GiB
    huge = ("optim.micro_batch_size=64", "rollout.max_response_length=65536")
    out = run_tool("--devices", "cpu:4", "--programs", "update", "--hbm-gib", "8", "--set", *huge)
    assert out.returncode == 1 and "does not fit: update" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_default_config_on_a_small_tpu_topology(tmp_path):
    # XLA's TPU compiler on this CPU host: no TPU needed (takes minutes on 2 shared cores).
    out = run_tool("--topology", "v5e-4", "--json", tmp_path / "r.json", timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["topology"] == "v5e:2x2" and report["hbm_per_chip"] == 16 * GiB
    names = [r["program"] for r in report["programs"]]
    assert names == EVERY_PROGRAM
    assert all(r["fits"] and r["flops"] > 0 for r in report["programs"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_v4_compiles_one_device_per_chip(tmp_path):
    # libtpu's compile-only v4 topology lists TensorCores unless asked for megacore; a jax mesh
    # on a v4 needs one device per chip (before: an AssertionError from jax.make_mesh).
    out = run_tool("--topology", "v4-8", "--programs", "old_log_prob", "--json",
                   tmp_path / "r.json", timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["chips"] == 4 and report["mesh"]["fsdp"] == 4
    assert report["hbm_per_chip"] == 32 * GiB


@pytest.mark.slow
def test_lora_update_holds_adapter_moments_only(tmp_path):
    """The default run with LoRA on 4 fake CPU devices: the update program compiles and its
    arguments (adapters' AdamW state, bf16 base) are smaller than full fine-tuning's."""
    args = {}
    for name, sets in (("full", ()), ("lora", ("model.lora.rank=8",))):
        out = run_tool("--devices", "cpu:4", "--programs", "update", "--json",
                       tmp_path / f"{name}.json", *(("--set", *sets) if sets else ()))  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        rows = json.loads((tmp_path / f"{name}.json").read_text())["programs"]
        assert [r["program"] for r in rows] == ["update", "optimizer"]
        args[name] = rows[0]["arguments"]  # accumulator (adapters only with LoRA) + params
    assert 0 < args["lora"] < args["full"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize(
    "config,topology",
    [("qwen3_1p7b_v5e8_lora", "v5e-8"), ("qwen3_4b_v6e8_lora", "v6e-8"),
     ("qwen3_8b_v4-32_lora", "v4-32")],
)  # fmt: skip
def test_lora_configs_compile_for_their_slices(config, topology, tmp_path):
    # Two layers on XLA's TPU compiler (full depth takes minutes per program on 2 cores: the
    # full-depth per-chip figures in docs/TPU.md were measured by hand with the same command
    # without --num-layers). This checks the configs' shapes, sharding and adapters compile.
    out = run_tool(
        "--config", f"configs/{config}.yaml", "--topology", topology, "--num-layers", "2",
        "--programs", "engine,update", "--json", tmp_path / "r.json", timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["programs"] and all(r["fits"] for r in report["programs"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_engine_decode_compiles_the_tpu_kernel(tmp_path):
    # Qwen3-0.6B's head size (128) takes jax's ragged paged attention kernel: its decode program
    # must compile for a TPU (block sizes that fit the compiler's VMEM), one layer for speed.
    out = run_tool(
        "--topology", "v5e-4", "--programs", "engine", "--num-layers", "1",
        "--model-config", "configs/models/Qwen3-0.6B-Base", "--set",
        "rollout.max_response_length=4096", "--json", tmp_path / "r.json", timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["programs"]
    assert [r["program"] for r in rows] == ["engine_decode", "engine_prefill"]
    assert all(r["fits"] and r["arguments"] > 0 for r in rows)
    assert "tpu attention" in rows[0]["note"]  # the kernel, not the gather reference
