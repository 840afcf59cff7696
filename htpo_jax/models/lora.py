"""LoRA adapters on a `Decoder`: adding them, telling them from the frozen base, merging them,
and their PEFT (Hugging Face) layout.

An adapted `DenseGeneral` (y = x W) gets two `nnx.LoRAParam`s, A [*in, r] and B [r, *out]
(stacked layers: [L, *in, r] and [L, r, *out]), and computes y = x W + (alpha / r) (x A) B
(`DenseGeneral.lora_delta`). A starts uniform in +-1/sqrt(fan_in) and B at zero, as PEFT's
defaults, so a freshly adapted model is the base model exactly. Everything else (the base) is
frozen: the trainer differentiates only the `nnx.LoRAParam`s (`trainable_filter`), and the base
with the adapters switched off (`adapters_off`: B zeroed) is the KL reference for free.

Why not qwix (the library tunix uses): its NNX path creates the adapter weights lazily, on the
model's first call, as attributes of the module object that runs the matmul, and intercepts one
method only. Our decoder runs every layer from an `nnx.split` / `nnx.merge` copy inside
`lax.scan` (scanned layers) or a Python loop, so the weights qwix creates land on a temporary
copy and are lost (qwix 0.1.8 on this decoder: 0 LoRA parameters with `scan_layers=False`, then
"Cannot find rngs in the current module" on the next call; an IndexError while tracing the scan
with `scan_layers=True`), and the rollout engine calls `forward_kv` / `forward_cached`, not
`__call__`. Creating the adapters up front, as here, needs neither.

QLoRA bases (`base_dtype` int8 or nf4, `quantize_base`): every `DenseGeneral` kernel of the base
(adapted or not; the embedding, head and norms stay bfloat16) is replaced by codes and absmax
scales (`kernel_codes`, `kernel_scale`, models/quant.py) and dequantized to the compute dtype
inside each forward (`DenseGeneral.compute_kernel`: the training, scoring and rollout paths all
go through it). The quantization is deterministic, so a checkpoint still holds only the adapters:
the base is quantized again from `model.path` on resume. Why not qwix's `quantize` /
`dequantize` (qwix 0.1.8, `qtype="nf4"`; its int8 path is elementwise and would do): its nf4
conversion ravels the whole array and vmaps an argmin over the 16 values (quantize) or a table
lookup (dequantize) over the flat elements. A flat array cannot carry a kernel's 2-d sharding, so
under our FSDP x tensor mesh the partitioner gathers the whole kernel on every chip first
(measured on 8 CPU devices, mesh fsdp=4 x tensor=2, a [2, 256, 128] kernel: `qwix.quantize`
returns replicated codes, and the compiled `qwix.dequantize` of sharded codes all-gathers them
over both axes before the lookup), which for a stacked [L, D, F] kernel of an 8B model is
gigabytes a chip at load and a full-layer gather in every forward. models/quant.py does the
same math elementwise (the nearest value is a count of midpoints below w / s, the lookup a tree of
selects) with the codes in the kernel's own shape and sharding (130 lines with int8); its
codebook and nf4 codes are tested equal to qwix's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.infra.sharding import logical_sharding, variable_sharding
from htpo_jax.models import quant
from htpo_jax.models.decoder import Decoder, DenseGeneral

# Module paths ('.'-joined; scanned layers have no layer index) that get adapters by default:
# every attention and MLP projection (q/k/v/o, gate/up/down: all `DenseGeneral`s of the decoder),
# PEFT's usual "all-linear" set minus the head.
DEFAULT_TARGET = r"_proj$"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapter settings: rank r (0 = no adapters), alpha (the update is scaled by alpha / r),
    `target` (a regex searched in each `DenseGeneral`'s module path) and the dtype the frozen
    base is stored in (a float dtype, or int8 / nf4: a quantized QLoRA base whose nf4 blocks
    are `block_size` weights)."""

    rank: int = 0
    alpha: float = 16.0
    target: str = DEFAULT_TARGET
    base_dtype: str = "bfloat16"
    block_size: int = 64

    @property
    def quantized(self) -> bool:
        """Whether the base's projections are stored quantized (QLoRA)."""
        return self.base_dtype in quant.QTYPES

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on the low-rank update (PEFT's `scaling`)."""
        return self.alpha / self.rank


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _stack_depth(module: DenseGeneral) -> int:
    """Leading stacked axes of the kernel (1 for scanned layers, else 0)."""
    rhs = module.spec.split(",")[1].split("->")[0]
    return _kernel_var(module).ndim - len(rhs)


def _kernel_var(m: DenseGeneral) -> nnx.Variable:
    """The kernel's variable: the float kernel, or a QLoRA base's codes (same shape)."""
    return m.kernel_codes if is_quantized(m) else m.kernel


def is_quantized(m: DenseGeneral) -> bool:
    """Whether `m`'s kernel is stored quantized (`quantize_base`)."""
    return getattr(m, "kernel_codes", None) is not None


def base_kernel(m: DenseGeneral, dtype=jnp.float32) -> jax.Array:
    """The base kernel W in `dtype`: the parameter, or a QLoRA base dequantized."""
    if not is_quantized(m):
        return m.kernel[...].astype(dtype)
    codes = m.kernel_codes
    return quant.dequantize(
        codes[...], m.kernel_scale[...], m.quant, _stack_depth(m), m.in_ndim, dtype
    )


def quantize_base(model: Decoder, qtype: str, block_size: int = 64, mesh=None) -> int:
    """Replaces every `DenseGeneral` kernel of `model` (in place) by its `qtype` codes and scales
    (models/quant.py), sharded like the kernel on `mesh`; returns how many. A ValueError naming
    `model.lora.block_size` and the module when nf4's block does not divide a module's input."""
    n = 0
    for path, m in nnx.iter_modules(model):
        if not isinstance(m, DenseGeneral) or is_quantized(m):
            continue
        lead, shape = _stack_depth(m), m.kernel.shape
        in_size = math.prod(shape[lead : lead + m.in_ndim])
        try:
            s_shape = quant.scale_shape(shape, lead, m.in_ndim, qtype, block_size)
        except ValueError:
            raise ValueError(
                f"model.lora.block_size {block_size} must divide the input size {in_size} of "
                f"{_path_name(path)} (model.lora.base_dtype {qtype}: one absmax scale per "
                f"block_size inputs); pick a divisor of {in_size}"
            ) from None
        axes = tuple(m.kernel.get_metadata().get("logical_axes") or (None,) * len(shape))
        first_in = axes[lead] if m.in_ndim else None
        s_axes = axes[:lead] + (first_in,) + axes[lead + m.in_ndim :]
        fn = functools.partial(
            quant.quantize, qtype=qtype, lead=lead, in_ndim=m.in_ndim, block_size=block_size
        )
        if mesh is not None:
            shardings = (
                logical_sharding(axes, mesh, shape),
                logical_sharding(s_axes, mesh, s_shape),
            )
            codes, scale = jax.jit(fn, out_shardings=shardings)(m.kernel[...])
        else:
            codes, scale = jax.jit(fn)(m.kernel[...])
        m.kernel_codes = nnx.Param(codes, logical_axes=axes)
        m.kernel_scale = nnx.Param(scale, logical_axes=s_axes)
        m.quant = qtype
        del m.kernel
        n += 1
    return n


def targets(model: Decoder, target: str) -> list[tuple[tuple, DenseGeneral]]:
    """(module path, module) of every `DenseGeneral` whose '.'-joined path matches `target`."""
    pattern = re.compile(target)
    return [
        (path, m)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, DenseGeneral) and pattern.search(_path_name(path))
    ]


def add_adapters(model: Decoder, spec: LoraSpec, *, seed: int = 0, mesh=None) -> int:
    """Adds float32 adapters to the target projections of `model` (in place) and stores every
    other parameter in `spec.base_dtype` (int8 / nf4: every projection's kernel quantized,
    `quantize_base`, the rest bfloat16); returns the number of adapted projections (a
    ValueError when `spec.target` matches none). With `mesh`, adapters are sharded like their
    kernels (the rank axis replicated)."""
    found = targets(model, spec.target)
    if not found:
        raise ValueError(f"model.lora.target {spec.target!r} matches no projection of the model")
    key = jax.random.key(seed)
    base_dtype = jnp.dtype(jnp.bfloat16 if spec.quantized else spec.base_dtype)
    if spec.quantized:  # from the loaded kernels, before they are rounded to base_dtype
        quantize_base(model, spec.base_dtype, spec.block_size, mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] not in ("kernel_codes", "kernel_scale"):  # scales stay float32
            var.set_value(var[...].astype(base_dtype))
    model.param_dtype = base_dtype
    for i, (_, m) in enumerate(found):
        lead = _stack_depth(m)
        k = _kernel_var(m).shape
        in_shape, out_shape = k[lead : lead + m.in_ndim], k[lead + m.in_ndim :]
        axes = tuple(_kernel_var(m).get_metadata().get("logical_axes") or (None,) * len(k))
        in_axes, out_axes = axes[: lead + m.in_ndim], axes[lead + m.in_ndim :]
        bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT: kaiming_uniform(a=sqrt(5))
        a_shape = k[:lead] + in_shape + (spec.rank,)
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        b = jnp.zeros(k[:lead] + (spec.rank,) + out_shape, jnp.float32)
        m.lora_a = nnx.LoRAParam(a, logical_axes=in_axes + ("lora_rank",))
        m.lora_b = nnx.LoRAParam(b, logical_axes=axes[:lead] + ("lora_rank",) + out_axes)
        m.lora_scale = spec.scale
        if mesh is not None:
            for var in (m.lora_a, m.lora_b):
                var.set_value(jax.device_put(var[...], variable_sharding(var, mesh)))
    return len(found)


def has_adapters(tree) -> bool:
    """Whether a model or a state holds any adapter."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return bool(jax.tree.leaves(nnx.filter_state(state, nnx.LoRAParam)))


def trainable_filter(lora: bool):
    """The nnx filter of what the optimizer updates: the adapters with LoRA, else every Param."""
    return nnx.LoRAParam if lora else nnx.Param


def split_adapters(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, frozen base) of a full parameter state; `nnx.merge_state` joins them back."""
    return nnx.split_state(params, nnx.LoRAParam, ...)


def with_adapters(full: nnx.State, adapters: nnx.State) -> nnx.State:
    """`full` with its adapters replaced by `adapters` (the base arrays shared, not copied)."""
    _, base = split_adapters(full)
    return nnx.merge_state(adapters, base)


def adapters_off(params: nnx.State) -> nnx.State:
    """The base policy in the adapted model's structure: every B zeroed (A kept), so the update
    is exactly zero. The base arrays are shared, not copied (the KL reference costs only the
    adapters' size)."""
    adapters, base = split_adapters(params)
    flat = [
        (path, var.replace(jnp.zeros_like(var[...])) if path[-1] == "lora_b" else var)
        for path, var in nnx.to_flat_state(adapters)
    ]
    return nnx.merge_state(nnx.from_flat_state(flat), base)


def merged_kernel(m: DenseGeneral) -> jax.Array:
    """The kernel with the adapter folded in, W + scale * A B, in the kernel's shape, computed
    in float32 (a QLoRA base: W dequantized), in the kernel's dtype (quantized: float32)."""
    lead = _stack_depth(m)
    a, b = m.lora_a[...].astype(jnp.float32), m.lora_b[...].astype(jnp.float32)
    r = a.shape[-1]
    k = _kernel_var(m).shape
    a2 = a.reshape(k[:lead] + (-1, r))  # [..., prod(in), r]
    b2 = b.reshape(k[:lead] + (r, -1))  # [..., r, prod(out)]
    delta = (a2 @ b2).reshape(k) * m.lora_scale
    dtype = jnp.float32 if is_quantized(m) else m.kernel.dtype
    return (base_kernel(m) + delta).astype(dtype)


def merge_adapters(model: Decoder, dtype=None) -> Decoder:
    """A copy of `model` without adapters whose kernels are W + scale * A B (the same function
    up to rounding; a QLoRA base's W dequantized, so not the original weights it was quantized
    from), every parameter in `dtype` (default: the adapters' float32)."""
    model = nnx.clone(model)
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    for _, m in nnx.iter_modules(model):
        if not isinstance(m, DenseGeneral):
            continue
        adapted = getattr(m, "lora_a", None) is not None
        if not adapted and not is_quantized(m):
            continue
        w = merged_kernel(m) if adapted else base_kernel(m)
        if is_quantized(m):
            axes = m.kernel_codes.get_metadata().get("logical_axes")
            m.kernel = nnx.Param(w, logical_axes=axes)
            del m.kernel_codes, m.kernel_scale, m.quant
        else:
            m.kernel.set_value(w)
        if adapted:
            del m.lora_a, m.lora_b, m.lora_scale
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(var[...].astype(dtype))
    model.param_dtype = dtype
    return model


# ---------------------------------------------------------------- PEFT layout
def peft_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them for a HF causal LM: `base_model.model.model.layers.{i}.
    {self_attn|mlp}.{name}.lora_A.weight` [r, in] and `....lora_B.weight` [out, r], float32
    (HF flattens a multi-axis input or output in the same row-major order as our kernels)."""
    out = {}
    for path, m in nnx.iter_modules(model):
        if not isinstance(m, DenseGeneral) or getattr(m, "lora_a", None) is None:
            continue
        lead = _stack_depth(m)
        a = np.asarray(jax.device_get(m.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(m.lora_b[...]), np.float32)
        r = a.shape[-1]
        layers = range(a.shape[0]) if lead else [None]
        for i in layers:
            a_l, b_l = (a, b) if i is None else (a[i], b[i])
            names = path if i is None else (path[0], i) + tuple(path[1:])
            prefix = "base_model.model.model." + _path_name(names)
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_l.reshape(-1, r).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_l.reshape(r, -1).T)
    return out


def peft_config(model: Decoder, base_path: str = "") -> dict:
    """`adapter_config.json` for `peft.PeftModel.from_pretrained` (plain LoRA, scaling alpha/r).
    `target_modules` is the list of adapted projection names; every layer has the same set
    (a ValueError otherwise: PEFT's name list could not say which layers)."""
    per_layer: dict[str, set] = {}
    rank = scale = None
    for path, m in nnx.iter_modules(model):
        if isinstance(m, DenseGeneral) and getattr(m, "lora_a", None) is not None:
            layer = path[1] if not model.scan_layers else None
            per_layer.setdefault(str(layer), set()).add(str(path[-1]))
            rank, scale = m.lora_a.shape[-1], m.lora_scale
    names = {frozenset(v) for v in per_layer.values()}
    if (
        rank is None
        or len(names) != 1
        or (not model.scan_layers and len(per_layer) != len(model.layers))
    ):
        raise ValueError("the adapters do not cover the same projections in every layer")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": int(rank),
        "lora_alpha": float(scale * rank),
        "lora_dropout": 0.0,
        "target_modules": sorted(next(iter(names))),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
