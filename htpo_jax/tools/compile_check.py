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
    if hlo_dir:
        name = "".join(ch if ch.isalnum() else "_" for ch in f"{prog.name}_{prog.shape}")
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"{name}.hlo.txt").write_text(compiled.as_text())
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


def table(rows: list[dict], hbm: int, limit: int) -> str:
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
    rows = []
    for name in programs:
        for prog in PROGRAMS[name](ctx):
            rows.append(measure(prog, mesh, limit, hlo_dir))
            r = rows[-1]
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
    from htpo_jax.infra.topology import TargetError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU slice: v5p-8 ... v5p-512, v5e-N, v6e-N")
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
