"""The decoder family (Qwen3, Qwen2/2.5, Llama 3), HF checkpoint interop and chunked log-probs.

See docs/MODELS.md. The public names are re-exported here.
"""

from htpo_jax.models.decoder import (
    CACHE_LOGICAL_AXES,
    Decoder,
    KVCache,
    LayerCache,
    dense_kv_fn,
    per_layer,
    positions_from_mask,
)
from htpo_jax.models.hf_io import from_pretrained, load_tokenizer, save_pretrained
from htpo_jax.models.logprobs import chunked_logprobs_and_entropy, logprobs_and_entropy
from htpo_jax.models.model_config import ModelConfig, RopeScaling

__all__ = [
    "CACHE_LOGICAL_AXES",
    "Decoder",
    "KVCache",
    "LayerCache",
    "ModelConfig",
    "RopeScaling",
    "chunked_logprobs_and_entropy",
    "dense_kv_fn",
    "from_pretrained",
    "load_tokenizer",
    "logprobs_and_entropy",
    "per_layer",
    "positions_from_mask",
    "save_pretrained",
]
