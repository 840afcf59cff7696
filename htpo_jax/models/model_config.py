"""`ModelConfig`: the decoder's architecture, read from and written to a HF `config.json`.

Owns the mapping between HF config keys and the switches of `models/decoder.py`. Both HF styles
are read: transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`). What is
written carries both styles, so either major version of transformers loads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# model_type -> (q/k/v biases by default, q/k RMS norm, HF architecture name)
SUPPORTED_MODEL_TYPES: dict[str, tuple[bool, bool, str]] = {
    "qwen3": (False, True, "Qwen3ForCausalLM"),
    "qwen2": (True, False, "Qwen2ForCausalLM"),
    "llama": (False, False, "LlamaForCausalLM"),
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder. Frozen and hashable: modules keep it as static data."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; supported model types: "
                f"{sorted(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_heads, self.num_kv_heads
        attn = d * n * h * 2 + d * k * h * 2
        attn += (n + 2 * k) * h * self.qkv_bias + d * self.o_bias + 2 * h * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """A ModelConfig from a Hugging Face config.json dict; ValueError for a model type or
        feature that is not supported."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} in config.json is not supported; supported model "
                f"types: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; only 'silu'")
        if hf.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported (full attention only)")
        default_qkv_bias, qk_norm, _ = SUPPORTED_MODEL_TYPES[model_type]
        attention_bias = bool(hf.get("attention_bias", False))
        rope_theta, rope_scaling = _read_rope(hf)
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama and Qwen3 follow `attention_bias` (q/k/v/o).
            qkv_bias=default_qkv_bias or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)) and model_type == "llama",
            qk_norm=qk_norm,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_dict(self, dtype_name: str = "float32") -> dict[str, Any]:
        """The HF config.json dict of this model, with `dtype_name` as its torch_dtype / dtype."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
            rope_parameters = {**rope_scaling, "rope_theta": self.rope_theta}
        eos = list(self.eos_token_id)
        hf: dict[str, Any] = {
            "architectures": [SUPPORTED_MODEL_TYPES[self.model_type][2]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            # 5.x reads rope_parameters, 4.x reads rope_theta / rope_scaling.
            "rope_parameters": rope_parameters,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
            "use_cache": True,
        }
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.o_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        else:
            hf["use_sliding_window"] = False
        return hf

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """A ModelConfig from `<path>/config.json`."""
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_hf_dict(json.load(f))


def _rope_type(params: dict[str, Any]) -> str:
    return params.get("rope_type", params.get("type", "default"))


def _read_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) from either config.json style.

    Both keys are checked before either is used: a config may carry a 5.x `rope_parameters`
    that says `default` next to a 4.x `rope_scaling` that says `yarn`, and transformers (which
    reads `rope_scaling` first) would then run yarn while a reader of `rope_parameters` alone
    ran plain RoPE. Any rope type the decoder does not implement, in either key, is refused.
    """
    given = {
        key: hf[key] for key in ("rope_scaling", "rope_parameters") if isinstance(hf.get(key), dict)
    }
    for key, params in given.items():
        if _rope_type(params) not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"{key}: rope_type={_rope_type(params)!r} is not supported; supported rope "
                f"types: {list(SUPPORTED_ROPE_TYPES)} (the decoder would silently compute "
                "another position encoding)"
            )
    partial = [
        p.get("partial_rotary_factor")
        for p in (hf, *given.values())
        if "partial_rotary_factor" in p
    ]
    for factor in partial:
        if factor not in (None, 1, 1.0):
            raise ValueError(
                f"partial_rotary_factor={factor} is not supported (rotary on every head dim only)"
            )
    # transformers' precedence: a non-empty rope_scaling replaces rope_parameters.
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = params.get("rope_theta")
    if theta is None:
        theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    theta = float(theta)
    if _rope_type(params) == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"rope_type='llama3' needs {', '.join(missing)} in config.json")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
