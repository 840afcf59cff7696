"""Per-chip memory of the model's forward + backward, compiled for a TPU topology on this host.

    python benchmarks/tpu_memory.py [--topology v5p:2x2x1] [--tokens 22528] [--layers 1]
                                    [--impls xla,chunked,splash] [--json OUT]

No TPU needed: libtpu (`pip install -e ".[tpu]"`) compiles for `jax.experimental.topologies`
devices, and XLA's `memory_analysis()` gives the per-chip bytes (arguments, outputs,
temporaries). The program is what the update differentiates: Qwen3-8B shapes (vocab 151,936,
D 4,096, F 12,288, 32 q / 8 kv heads of 128; `--layers` decoder layers), bf16 compute over f32
parameters, remat, scanned layers, FSDP over every chip, one `--tokens`-long row per chip,
loss = sum of the chunked token log-probs; gradients come back sharded like the parameters.
One line per attention implementation (a table), and JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

for key, value in (
    ("TPU_SKIP_MDS_QUERY", "1"),
    ("TPU_ACCELERATOR_TYPE", "v5p-8"),
    ("TPU_WORKER_HOSTNAMES", "localhost"),
    ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),  # other processes on this host may hold libtpu too
):
    os.environ.setdefault(key, value)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_shapes import qwen3_8b, trainer_decoder  # noqa: E402

from htpo_jax.infra.sharding import logical_to_mesh_spec, make_mesh, state_shardings  # noqa: E402
from htpo_jax.models.logprobs import logprobs_and_entropy  # noqa: E402

GIB = 2**30


def compile_memory(mesh, cfg, impl: str, tokens: int, chunk: int) -> dict:
    model = nnx.eval_shape(lambda: trainer_decoder(cfg, impl, chunk))
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    batch = mesh.size  # one row per chip
    row_sharding = NamedSharding(
        mesh, logical_to_mesh_spec(("act_batch", None), (batch, tokens), mesh)
    )

    def loss(state, ids_bt, mask_bt):
        lp, _ = logprobs_and_entropy(nnx.merge(graphdef, state), ids_bt, mask_bt, chunk_size=1024)
        return (lp * mask_bt[:, 1:]).sum()

    fn = jax.jit(
        jax.grad(loss),
        in_shardings=(shardings, row_sharding, row_sharding),
        out_shardings=shardings,
    )
    abstract_state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=row_sharding)
    mask = jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=row_sharding)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = fn.lower(abstract_state, ids, mask).compile()
    mem = compiled.memory_analysis()
    return dict(
        impl=impl,
        tokens=tokens,
        layers=cfg.num_layers,
        chips=mesh.size,
        argument_gib=mem.argument_size_in_bytes / GIB,
        output_gib=mem.output_size_in_bytes / GIB,
        temp_gib=mem.temp_size_in_bytes / GIB,
        compile_s=time.perf_counter() - t0,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--tokens", type=int, default=22528)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=2048, help="query block of `chunked`")
    ap.add_argument("--impls", default="xla,chunked,splash")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=topo.devices)
    cfg = qwen3_8b(args.layers)
    print(
        f"{args.topology} ({mesh.size} chips, {topo.devices[0].device_kind}), Qwen3-8B shapes, "
        f"{args.layers} layer(s), {args.tokens} tokens per chip, fwd+bwd, bf16 over f32 params"
    )
    print(f"{'impl':<8} {'args GiB':>9} {'out GiB':>8} {'temp GiB':>9} {'compile s':>10}")
    rows = []
    for impl in args.impls.split(","):
        r = compile_memory(mesh, cfg, impl, args.tokens, args.chunk)
        rows.append(r)
        print(
            f"{impl:<8} {r['argument_gib']:9.2f} {r['output_gib']:8.2f} {r['temp_gib']:9.2f} "
            f"{r['compile_s']:10.1f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(topology=args.topology, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
