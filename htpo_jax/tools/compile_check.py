"""`python -m htpo_jax.compile_check --config FILE [--set ...] --topology v5p-64`: does a run fit?

Builds the run's mesh on a target TPU topology (XLA's TPU compiler from libtpu, on a CPU host: no
TPU needed; `pip install -e ".[tpu]"`) or on N fake CPU devices (`--devices cpu:4`), then lowers
and compiles every jitted program of an RL step at the config's largest shapes, from abstract
arrays only (nothing is allocated; the model is built from its `config.json` by `nnx.eval_shape`,
so the checkpoint need not exist). For each program it reports XLA's per-chip memory (arguments,
temporaries, outputs, aliased = donated), the training state that stays resident outside the
program, the chip's HBM and the compiled FLOPs, as a table and as JSON (`--json FILE`). It exits 1
naming each program whose peak exceeds the HBM minus a headroom (`--headroom`, default 10%).

The programs are built by the small functions in `compile_programs.PROGRAMS`, one per jitted
program of a step; a new one (e.g. a rollout engine's prefill and decode) is one more function.
`topology.py` maps slice names to libtpu topologies and HBM sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

from htpo_jax.infra.topology import resolve_target
from htpo_jax.run.config import Config, add_config_args, config_from_args
from htpo_jax.tools.compile_programs import (
    MODELS_DIR,
    PROGRAMS,
    Program,
    build_context,
    model_config_path,
)

DEFAULT_CONFIG = MODELS_DIR.parent / "default.yaml"
GiB = 2**30


# ---------------------------------------------------------------- compile, measure, report
def measure(prog: Program, mesh, limit: int, hlo_dir: str | None = None) -> dict:
    """Lower and compile one program; its per-chip memory (bytes) and FLOPs. With `hlo_dir`, the
    compiled HLO text goes to `<hlo_dir>/<program>_<shape>.hlo.txt` (to see e.g. the dtypes of
    the all-gathers)."""
    import jax

    t0 = time.perf_counter()
    try:
        with jax.set_mesh(prog.mesh or mesh):
            compiled = prog.fn.lower(*prog.args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return out_of_memory(prog, str(e), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    text = compiled.as_text() or ""
    if hlo_dir:
        name = "".join(ch if ch.isalnum() else "_" for ch in f"{prog.name}_{prog.shape}")
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"{name}.hlo.txt").write_text(text)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    # Donated arguments are reused for outputs (alias); the rest of the state stays resident.
    peak = arg + out - alias + temp + prog.resident
    return {
        "program": prog.name,
        "shape": prog.shape,
        "arguments": arg,
        "temporaries": temp,
        "outputs": out,
        "aliased": alias,
        "resident": prog.resident,
        "code": mem.generated_code_size_in_bytes,
        "peak": peak,
        "fits": peak <= limit,
        "flops": float((cost or {}).get("flops", float("nan"))),
        "bytes_accessed": float((cost or {}).get("bytes accessed", float("nan"))),
        "optimal_seconds": float((cost or {}).get("optimal_seconds", float("nan"))),
        # Pallas kernels (splash, ragged paged attention) lower to this custom call; the ones
        # jax ships carry no pl.CostEstimate, so the cost model sees their operands only.
        "pallas_calls": text.count('custom_call_target="tpu_custom_call"'),
        "compile_seconds": round(seconds, 1),
        "note": prog.note,
    }


def out_of_memory(prog: Program, message: str, seconds: float) -> dict:
    """The row of a program that the TPU compiler itself refused ("Ran out of memory on HBM"):
    the temporaries it asked for, parsed from its message, stand for the peak."""
    import re

    found = re.search(r"HLO temporaries \(([\d.]+)([KMGT])", message)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    temp = int(float(found.group(1)) * scale[found.group(2)]) if found else 0
    return {
        "program": prog.name,
        "shape": prog.shape,
        "arguments": 0,
        "temporaries": temp,
        "outputs": 0,
        "aliased": 0,
        "resident": prog.resident,
        "code": 0,
        "peak": temp + prog.resident,
        "fits": False,
        "flops": float("nan"),
        "compile_seconds": round(seconds, 1),
        "note": "the compiler ran out of memory: " + message.strip().splitlines()[0][:200],
    }


# ---------------------------------------------------------------- --time: cost model, floors
COST_KEYS = ("flops", "bytes_accessed", "optimal_seconds")


def per_layer_costs(cfg: Config, mesh, model_cfg, programs, hbm: int) -> dict:
    """{(program, index): (cost at 1 layer, cost at 2 layers)}, both with the layers unrolled
    (`model.scan_layers=false`): their difference is one layer, which a `lax.scan` of the layers
    counts once in the compiler's cost model."""
    cfg_u = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
    out: dict = {}
    for layers in (1, 2):
        m = dataclasses.replace(model_cfg, num_layers=layers)
        ctx = dataclasses.replace(build_context(cfg_u, mesh, m), hbm_bytes=hbm)
        for name in programs:
            for i, prog in enumerate(PROGRAMS[name](ctx)):
                r = measure(prog, mesh, 2**62)
                out.setdefault((name, i), []).append({k: r[k] for k in COST_KEYS})
    return out


def add_time(row: dict, name: str, fits: list | None, cfg: Config, model_cfg, target) -> None:
    """The row's compiler costs scaled by the trip counts it really runs, the Pallas kernels'
    FLOPs/bytes from shapes, and the physical floor, all per chip (see docs/TPU.md)."""
    from htpo_jax.tools.step_time import Shape

    pk, chips = target.peaks, target.chips
    itemsize = 4 if cfg.model.dtype in ("float32", "fp32") else 2
    shape = Shape.of(model_cfg, itemsize)
    tensor = max(cfg.mesh.tensor, 1)
    trips, notes = 1, []
    scale = {k: row[k] for k in COST_KEYS}
    # The optimizer maps over the stacked parameters (no layer loop): its count is already whole.
    if cfg.model.scan_layers and fits and row["program"] not in ("rollout", "optimizer"):
        for k in COST_KEYS:
            scale[k] += (model_cfg.num_layers - 1) * (fits[1][k] - fits[0][k])
        notes.append(f"x{model_cfg.num_layers} layers (1- and 2-layer unrolled compiles)")
    nums = [int(x) for x in re.findall(r"\d+", row["shape"])]
    if row["program"] == "engine_decode":
        trips = cfg.rollout.steps_per_call  # the decode while loop: its body counted once
        notes.append(f"x{trips} decode steps")
    elif row["program"] == "rollout":
        notes.append("decode loop counted once (not scaled: prefill sits in the same program)")
    scale = {k: v * trips for k, v in scale.items()}
    extra_flops = extra_bytes = 0.0
    floor = float("nan")
    dims = {}  # the call's shape, for step_time's calibration (`step_time --compiled`)
    if row["program"] == "engine_decode":
        rows, pages = nums[0], nums[1]
        dims = {"rows": rows, "pages": pages}
        tokens = rows * pages * cfg.rollout.page_size  # every row at the table's full width
        kv = tokens * shape.kv_token_bytes / tensor
        if row["pallas_calls"]:
            extra_bytes = trips * kv
            extra_flops = trips * 4.0 * tokens * shape.q_dim * shape.layers / tensor
        w = shape.matmul_params * itemsize / tensor
        floor = trips * (w + kv) / pk.hbm_bytes_per_s
    elif row["program"] == "optimizer":
        floor = 7 * 4 * shape.params / chips / pk.hbm_bytes_per_s
    elif row["program"] in ("update", "old_log_prob", "engine_prefill") and len(nums) >= 2:
        rows, t = (nums[-3], sum(nums[-2:])) if len(nums) >= 3 else (nums[0], nums[1])
        dims = {"rows": rows, "tokens": t}
        passes = (4.0 if cfg.model.remat else 3.0) if row["program"] == "update" else 1.0
        fwd = shape.forward_flops(rows, t) / chips
        attn = fwd - 2.0 * shape.matmul_params * rows * t / chips
        if row["pallas_calls"]:
            extra_flops = passes * attn
        floor = (3.0 if row["program"] == "update" else 1.0) * fwd / pk.bf16_flops
    if row["pallas_calls"]:
        added = f"+{extra_flops / 1e12:.3g} TFLOP, +{extra_bytes / 2**30:.3g} GiB"
        notes.append(f"{row['pallas_calls']} Pallas calls not counted by XLA: {added} from shapes")
    seconds = scale["optimal_seconds"] + max(
        extra_flops / pk.bf16_flops, extra_bytes / pk.hbm_bytes_per_s
    )
    row["time"] = {
        "trips": trips,
        "flops": scale["flops"] + extra_flops,
        "bytes_accessed": scale["bytes_accessed"] + extra_bytes,
        "compiler_seconds": scale["optimal_seconds"],
        "seconds": seconds,
        "floor_seconds": floor,
        "notes": "; ".join(notes),
        **dims,
    }


def time_table(rows: list[dict]) -> str:
    """Markdown table of each program's compiled cost (`--time`): TFLOP, GB, compiler and estimated
    seconds against the floor."""
    head = "| program | shape | TFLOP | GB | compiler s | est s | floor s | est/floor | notes |"
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        t = r.get("time")
        if not t:
            continue
        fl = t["floor_seconds"]
        ratio = f"{t['seconds'] / fl:.2f}" if fl == fl and fl > 0 else "-"
        lines.append(f"| {r['program']} | {r['shape']} | {t['flops'] / 1e12:.4g} | "
                     f"{t['bytes_accessed'] / 1e9:.4g} | {t['compiler_seconds']:.4g} | "
                     f"{t['seconds']:.4g} | {fl:.4g} | {ratio} | {t['notes']} |")  # fmt: skip
    lines.append("per chip, one call of each program; compiler s = XLA's optimal_seconds")
    return "\n".join(lines)


def table(rows: list[dict], hbm: int, limit: int) -> str:
    """Markdown table of each program's per-chip memory (GiB), whether it fits, and its TFLOP."""
    g = lambda b: f"{b / GiB:.2f}"
    head = ("program", "shape", "args", "temp", "out", "alias", "resid", "peak", "fits", "TFLOP")
    lines = [
        " | ".join(head),
        " | ".join("---" for _ in head),
    ]
    for r in rows:
        lines.append(
            " | ".join(
                [
                    r["program"],
                    r["shape"],
                    g(r["arguments"]),
                    g(r["temporaries"]),
                    g(r["outputs"]),
                    g(r["aliased"]),
                    g(r["resident"]),
                    g(r["peak"]),
                    "yes" if r["fits"] else "NO",
                    f"{r['flops'] / 1e12:.3g}",
                ]
            )
        )
    lines.append(f"per-chip GiB; HBM {g(hbm)} GiB per chip, limit {g(limit)} GiB (minus headroom)")
    return "\n".join("| " + x + " |" if i < len(lines) - 1 else x for i, x in enumerate(lines))


def run_check(
    cfg: Config,
    target,
    *,
    headroom: float,
    programs,
    model_config=None,
    layers=None,
    fail_fast=False,
    on_row=None,
    hlo_dir=None,
    time_costs=False,
):
    """Compile every selected program on `target`; returns the report dict."""
    from htpo_jax.infra.sharding import make_mesh
    from htpo_jax.models.model_config import ModelConfig

    target.setup_env()
    devices = target.devices()
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    except ValueError as e:
        raise ConfigProblem(f"mesh: {e}") from None
    path = model_config_path(cfg, model_config)
    model_cfg = ModelConfig.from_pretrained(path.parent)
    if layers:
        model_cfg = dataclasses.replace(model_cfg, num_layers=layers)
    ctx = dataclasses.replace(build_context(cfg, mesh, model_cfg), hbm_bytes=target.hbm_bytes)
    limit = int(target.hbm_bytes * (1.0 - headroom))
    fits = {}
    if time_costs:
        if target.peaks is None:
            raise ConfigProblem("--time needs a TPU target (--topology): no CPU cost model")
        if cfg.model.scan_layers:  # unrolled layers: the compiler already counts them all
            fits = per_layer_costs(cfg, mesh, model_cfg, programs, target.hbm_bytes)
    rows = []
    for name in programs:
        for i, prog in enumerate(PROGRAMS[name](ctx)):
            rows.append(measure(prog, mesh, limit, hlo_dir))
            r = rows[-1]
            if time_costs and "ran out" not in r["note"]:
                add_time(r, name, fits.get((name, i)), cfg, model_cfg, target)
            if on_row is not None:  # e.g. write the JSON so far: a stopped run keeps its rows
                on_row(rows)
            print(
                f"compiled {r['program']} [{r['shape']}] in {r['compile_seconds']:.0f}s: "
                f"peak {r['peak'] / GiB:.2f} GiB per chip",
                file=sys.stderr,
                flush=True,
            )
            if fail_fast and not r["fits"]:
                break
        if fail_fast and rows and not rows[-1]["fits"]:
            break
    return {
        "target": target.name,
        "chips": target.chips,
        "topology": target.topology,
        "hbm_per_chip": target.hbm_bytes,
        "headroom": headroom,
        "limit_per_chip": limit,
        "model_config": str(path),
        "num_layers": model_cfg.num_layers,
        "mesh": dict(mesh.shape),
        "programs": rows,
        "fits": all(r["fits"] for r in rows),
    }


class ConfigProblem(ValueError):
    """Bad input found after parsing (mesh vs devices, missing model config): one line."""


def main(argv=None) -> int:
    """Compiles the config's programs for the target and prints their memory (and with --time, cost)
    tables; exit 0 when all fit, 1 when one does not, 2 on a bad config, target, option or file."""
    from htpo_jax.infra.topology import TargetError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU slice: v5p-8 ... v5p-512, v4-8 ..., v5e-N, v6e-N")
    where.add_argument("--devices", help="fake CPU devices: cpu:N")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--headroom", type=float, default=0.1, help="HBM share kept free (0.1)")
    parser.add_argument("--hbm-gib", type=float, help="HBM per chip (default: the chip's)")
    parser.add_argument("--model-config", help="config.json (or its dir) of the model")
    parser.add_argument(
        "--programs", default=",".join(PROGRAMS), help=f"subset of {','.join(PROGRAMS)}"
    )
    parser.add_argument(
        "--fail-fast", action="store_true", help="stop at the first program that does not fit"
    )
    parser.add_argument(
        "--num-layers", type=int, help="build the model with fewer layers (quick trials only)"
    )
    parser.add_argument("--hlo", metavar="DIR", help="write each compiled program's HLO text here")
    parser.add_argument(
        "--time", action="store_true", help="also the compiler's time per program vs its floor"
    )
    args = parser.parse_args(argv)
    if args.config is None:  # as train.py: the embedded default run
        args.config = str(DEFAULT_CONFIG)
    cfg = config_from_args(args)
    programs = [p for p in args.programs.split(",") if p]
    try:
        bad = [p for p in programs if p not in PROGRAMS]
        if bad:
            raise ConfigProblem(f"--programs: unknown {bad}; known: {', '.join(PROGRAMS)}")
        if not 0 <= args.headroom < 1:
            raise ConfigProblem(f"--headroom: must be in [0, 1), got {args.headroom}")
        target = resolve_target(args.topology, args.devices, args.hbm_gib)
        report = run_check(
            cfg,
            target,
            headroom=args.headroom,
            programs=programs,
            model_config=args.model_config,
            layers=args.num_layers,
            fail_fast=args.fail_fast,
            hlo_dir=args.hlo,
            time_costs=args.time,
            on_row=(lambda rows: Path(args.json).write_text(json.dumps(rows, indent=2) + "\n"))
            if args.json
            else None,
        )
    except (TargetError, ConfigProblem, FileNotFoundError) as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    print(f"target {report['target']} ({report['chips']} chips), mesh {report['mesh']}, "
          f"model {report['model_config']} ({report['num_layers']} layers)")  # fmt: skip
    print(table(report["programs"], report["hbm_per_chip"], report["limit_per_chip"]))
    if args.time:
        print(time_table(report["programs"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = [r for r in report["programs"] if not r["fits"]]
    for r in failed:
        print(
            f"does not fit: {r['program']} [{r['shape']}] needs {r['peak'] / GiB:.2f} GiB per "
            f"chip > {report['limit_per_chip'] / GiB:.2f} GiB"
            + (f" ({r['note']})" if "ran out" in r["note"] else ""),
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
