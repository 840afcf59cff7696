"""The decoder family (Qwen3, Qwen2/2.5, Llama 3), HF checkpoint interop and chunked log-probs.

See docs/MODELS.md. The public names are re-exported here.
"""

from htpo_jax.models.decoder import (
    CACHE_LOGICAL_AXES,
    Decoder,
    LayerCache,
    positions_from_mask,
)
from htpo_jax.models.hf_io import from_pretrained, load_tokenizer, save_pretrained
from htpo_jax.models.logprobs import chunked_logprobs_and_entropy, logprobs_and_entropy
from htpo_jax.models.model_config import ModelConfig, RopeScaling

__all__ = [
    "CACHE_LOGICAL_AXES",
    "Decoder",
    "LayerCache",
    "ModelConfig",
    "RopeScaling",
    "chunked_logprobs_and_entropy",
    "from_pretrained",
    "load_tokenizer",
    "logprobs_and_entropy",
    "positions_from_mask",
    "save_pretrained",
]
