"""The models the benchmark scripts build: Qwen3 shapes and the trainer's model setting.

Imported by the scripts next to it (`python benchmarks/<script>.py` puts this folder first on
sys.path), so every benchmark times the same configuration the trainer runs.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from htpo_jax.models.decoder import Decoder
from htpo_jax.models.model_config import ModelConfig


def qwen3(vocab, hidden, ffn, layers, heads, kv_heads, head_dim, *, tied=True, **kw) -> ModelConfig:
    """A Qwen3-architecture ModelConfig (q/k norms) of this size; `tied`: tied embeddings."""
    return ModelConfig(model_type="qwen3", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=ffn, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, qk_norm=True,
                       tie_word_embeddings=tied, **kw)  # fmt: skip


# (vocab, hidden D, FFN F, layers, heads, KV heads, head dim)
TINY = qwen3(512, 64, 128, 2, 4, 2, 16)  # the --tiny code paths, any device
QWEN3_0P6B = qwen3(151936, 1024, 3072, 28, 16, 8, 128)


def qwen3_8b(layers: int = 36) -> ModelConfig:
    """Qwen3-8B's shapes with `layers` decoder layers (untied, rope theta 1e6)."""
    return qwen3(151936, 4096, 12288, layers, 32, 8, 128, tied=False, rope_theta=1000000.0)


def trainer_decoder(cfg: ModelConfig, impl: str, chunk: int | None, seed: int = 0) -> Decoder:
    """The update's model setting: bf16 compute over f32 parameters, remat, `impl` attention.
    Call it inside nnx.jit (materialized) or nnx.eval_shape (abstract)."""
    return Decoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True,
                   attention_impl=impl, attention_chunk_size=chunk,
                   rngs=nnx.Rngs(seed))  # fmt: skip
