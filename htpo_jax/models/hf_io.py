"""HF checkpoints in and out: `config.json` + safetensors <-> `Decoder`; tokenizers.

Parameter names map one to one: our module path `layers.3.self_attn.q_proj.kernel` is HF
`model.layers.3.self_attn.q_proj.weight` (`scale` of a norm is `weight` too, `embed_tokens` is
`model.embed_tokens.weight`, `lm_head` is `lm_head.weight`). Only layouts differ: HF keeps every
linear weight as [out, in]; a `DenseGeneral` kernel is [*in_shape, *out_shape] (e.g. q_proj
[D, N, H] from HF [N*H, D]). The conversion is a reshape and a transpose of a memory-mapped view,
so with a mesh each device's shard is copied straight from the file.

Scanned layers (`scan_layers=True`): our `layers.self_attn.q_proj.kernel` [L, D, N, H] stacks
the L tensors `model.layers.{i}.self_attn.q_proj.weight`; loading stacks the per-layer views
(each device still reads only its slice of each), saving writes one tensor per layer.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.infra.sharding import variable_sharding
from htpo_jax.models.decoder import Decoder, DenseGeneral
from htpo_jax.models.model_config import ModelConfig
from htpo_jax.models.safetensors_io import LazyCheckpoint, write_checkpoint

log = logging.getLogger(__name__)

# Checkpoint tensors that carry no parameters of ours (old rotary buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple) -> str:
    """Our flat-state path -> HF tensor name."""
    if path == ("lm_head",):
        return "lm_head.weight"
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight"
    last = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return "model." + ".".join(map(str, path[:-1])) + "." + last


def _per_layer_paths(model: nnx.Module, path: tuple) -> list[tuple] | None:
    """For a stacked (scanned) layer parameter, the unstacked path of each layer; else None."""
    if not getattr(model, "scan_layers", False) or path[0] != "layers":
        return None
    return [("layers", i) + tuple(path[1:]) for i in range(model.cfg.num_layers)]


def _submodule(model: nnx.Module, path: tuple):
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model


def _layout(model: nnx.Module, path: tuple, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The one table of layout rules: (perm, HF shape) such that the HF tensor of our parameter
    at `path` (of `shape`) is `ours.transpose(perm).reshape(HF shape)`. The three conversions
    below are derived from it."""
    shape, n = tuple(shape), len(shape)
    if path == ("lm_head",):  # ours [D, V], HF [V, D]
        return (1, 0), shape[::-1]
    if path[-1] == "kernel" and isinstance(mod := _submodule(model, path[:-1]), DenseGeneral):
        k = mod.in_ndim  # ours [*in, *out], HF [prod(out), prod(in)]
        return (*range(k, n), *range(k)), (math.prod(shape[k:]), math.prod(shape[:k]))
    if path[-1] == "bias":  # ours [*out], HF [prod(out)]
        return tuple(range(n)), (math.prod(shape),)
    return tuple(range(n)), shape  # embeddings, norms: the same layout


def hf_to_ours(model: nnx.Module, path: tuple, hf: np.ndarray, shape) -> np.ndarray:
    """A view of HF tensor `hf` in our layout (no copy for contiguous inputs)."""
    perm, _ = _layout(model, path, shape)
    permuted = tuple(shape[i] for i in perm)  # our axes in HF's order, before HF's flattening
    return hf.reshape(permuted).transpose(np.argsort(perm))


def ours_to_hf(model: nnx.Module, path: tuple, x):
    """Our parameter `x` at `path` in HF's layout."""
    perm, shape = _layout(model, path, x.shape)
    return x.transpose(perm).reshape(shape)


def hf_shape(model: nnx.Module, path: tuple, shape) -> tuple[int, ...]:
    """Shape of the HF tensor for our parameter of `shape` at `path`."""
    return _layout(model, path, shape)[1]


def decoder_options(model_cfg) -> dict:
    """`from_pretrained` keyword arguments from the run config's `model:` section."""
    return dict(
        remat=model_cfg.remat,
        attention_chunk_size=model_cfg.attention_chunk_size or None,
        attention_impl=model_cfg.attention_impl,
        scan_layers=model_cfg.scan_layers,
    )


# Names people pass for a dtype (transformers, PyTorch, the config's own): all mean these.
DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "f32": "float32",
    "float32": "float32",
    "float": "float32",
    "fp16": "float16",
    "f16": "float16",
    "float16": "float16",
    "half": "float16",
}


def resolve_dtype(dtype, what: str = "dtype"):
    """A compute or parameter dtype from a jnp/numpy dtype or a name such as "bf16", "bfloat16",
    "fp32", "float32" or "torch.bfloat16"; a floating dtype, else a one-line ValueError."""
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.").removeprefix("jnp.")
        if name not in DTYPE_NAMES:
            raise ValueError(
                f"{what} {dtype!r} is not a floating dtype name; use one of "
                f"{', '.join(sorted(DTYPE_NAMES))}"
            )
        return jnp.dtype(DTYPE_NAMES[name])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{what} {dtype!r} is not a dtype") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"{what} {dtype!r} is not a floating dtype (bfloat16, float32, ...)")
    return resolved


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.bfloat16,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
    attention_chunk_size: int | None = None,
    attention_impl: str = "auto",
    scan_layers: bool = True,
) -> Decoder:
    """Loads a HF checkpoint directory (config.json + one or many safetensors files).

    `dtype` is the compute dtype, `param_dtype` the stored one (default: `dtype`), each a dtype
    or a name ("bf16", "bfloat16", "fp32", "float32", ...: `resolve_dtype`); `remat`,
    `attention_chunk_size`, `attention_impl` and `scan_layers` are passed to `Decoder`. With
    `mesh`, every parameter is created already sharded by its logical axes
    (`htpo_jax.infra.sharding`), each device reading only its own slice from the memory-mapped file.
    """
    cfg = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    param_dtype = dtype if param_dtype is None else resolve_dtype(param_dtype, "param_dtype")
    np_dtype = np.dtype(param_dtype)
    options = dict(
        remat=remat,
        attention_chunk_size=attention_chunk_size,
        attention_impl=attention_impl,
        scan_layers=scan_layers,
    )
    make = lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **options)
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    ckpt = LazyCheckpoint(path)
    names = set(ckpt.keys())
    flat = []
    missing = []

    def find(name):  # the checkpoint's key for our HF name, or None
        if name not in ckpt and name.startswith("model."):
            name = name[len("model.") :]  # a bare base-model checkpoint (no `model.` prefix)
        return name if name in ckpt else None

    for var_path, var in nnx.to_flat_state(abstract_state):
        layer_paths = _per_layer_paths(abstract, var_path)
        hf_paths = [var_path] if layer_paths is None else layer_paths
        shape = var.shape if layer_paths is None else var.shape[1:]
        views = []
        for p in hf_paths:
            key = find(hf_name(p))
            if key is None:
                missing.append(hf_name(p))
                continue
            names.discard(key)
            view = hf_to_ours(abstract, var_path, ckpt[key], shape)
            if view.shape != tuple(shape):
                raise ValueError(f"{key}: checkpoint gives {view.shape}, model expects {shape}")
            views.append(view)
        if len(views) != len(hf_paths):
            continue
        if layer_paths is None:
            read = lambda idx, view=views[0]: np.ascontiguousarray(view[idx]).astype(np_dtype)
        else:  # [L, ...]: stack the layers this slice covers, each read through its own view

            def read(idx, views=views):
                layers = range(len(views))[idx[0]]
                parts = [np.ascontiguousarray(views[i][idx[1:]]).astype(np_dtype) for i in layers]
                return np.stack(parts)

        full = tuple(slice(None) for _ in var.shape)
        if mesh is None:
            value = jax.device_put(read(full))
        else:
            value = jax.make_array_from_callback(var.shape, variable_sharding(var, mesh), read)
        flat.append((var_path, var.replace(value)))
    if missing:
        raise KeyError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:5]}")
    extra = [n for n in names if not n.endswith(_IGNORED_SUFFIXES)]
    if extra and not (cfg.tie_word_embeddings and extra == ["lm_head.weight"]):
        log.warning(
            "ignoring %d checkpoint tensors not in the model, e.g. %s", len(extra), extra[:5]
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_pretrained(
    model: Decoder,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer=None,
) -> None:
    """Writes `config.json` + safetensors that `transformers.AutoModelForCausalLM` loads.

    `dtype` (default: the parameters' dtype; a dtype or a name such as "bf16") is the stored
    dtype. Arrays are fetched from devices
    one at a time. Multi-host: every process must call this (sharded arrays are all-gathered);
    only process 0 writes.
    """
    os.makedirs(path, exist_ok=True)
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out_dtype = np.dtype(resolve_dtype(model.param_dtype if dtype is None else dtype))
    by_name = {}  # HF name -> (our path, variable, layer index of a stacked one or None)
    for var_path, var in flat:
        layer_paths = _per_layer_paths(model, var_path)
        if layer_paths is None:
            by_name[hf_name(var_path)] = (var_path, var, None)
        else:
            for i, p in enumerate(layer_paths):
                by_name[hf_name(p)] = (var_path, var, i)

    def fetch(name):
        var_path, var, layer = by_name[name]
        arr = var[...] if layer is None else var[...][layer]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            arr = multihost_utils.process_allgather(arr, tiled=True)
        return ours_to_hf(model, var_path, np.asarray(jax.device_get(arr)))

    specs = []
    for name, (var_path, var, layer) in by_name.items():
        shape = var.shape if layer is None else var.shape[1:]
        specs.append((name, hf_shape(model, var_path, shape), out_dtype))
    if jax.process_index() != 0:
        for name, _, _ in specs:  # keep the collectives in step with process 0
            fetch(name)
        return
    write_checkpoint(path, specs, fetch, max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.cfg.to_hf_dict(_torch_dtype_name(out_dtype)), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _torch_dtype_name(dtype: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def pad_id(tokenizer) -> int:
    """The one padding id of the run: prompts' left padding and response slots after the end.
    The tokenizer's pad token, else its EOS, else 0 (padding is always masked; it only has to be
    a valid token id)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0
