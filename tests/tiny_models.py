"""Tiny random models shared by the model tests (a helper module, not collected by pytest)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htpo_jax.models.decoder import Decoder
from htpo_jax.models.model_config import ModelConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
FAMILIES = [("qwen3", False), ("qwen3", True), ("qwen2", False), ("qwen2", True)]
FAMILIES += [("llama", False), ("llama", True)]


def hf_config_dict(family: str, tied: bool) -> dict:
    """A tiny config.json in transformers 5.x style (`rope_parameters`)."""
    d = dict(TINY, model_type=family, num_attention_heads=4, num_key_value_heads=2)
    d.update(tie_word_embeddings=tied, rms_norm_eps=1e-6, hidden_act="silu")
    if family == "qwen3":
        d["head_dim"] = 16
    if family == "llama":
        d["rope_parameters"] = {**LLAMA3_ROPE, "rope_theta": 500000.0}
    else:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return d


def to_4x_style(d: dict) -> dict:
    """The same config in transformers 4.x style (`rope_theta` + `rope_scaling` with `type`)."""
    d = dict(d)
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    return d


def left_padded_batch(seed=0, b=3, t=24, vocab=128):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (b, t))
    mask = np.ones((b, t), bool)
    mask[0, :5] = False
    mask[1, :1] = False
    return ids, mask


def random_decoder(family="qwen3", tied=False, seed=0, **kw) -> Decoder:
    """Our own random model, with norms and biases moved off their init values."""
    cfg = ModelConfig.from_hf_dict(hf_config_dict(family, tied))
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), **kw))  # no eager init
    rng = np.random.RandomState(seed)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = (path[-1] == "scale") + 0.1 * rng.standard_normal(var.shape)
        flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def small_qwen3(vocab: int, tied: bool = True) -> Decoder:
    """A 2-layer, 32-wide Qwen3-style model (1 kv head), float32: the trainer tests' policy."""
    cfg = ModelConfig.from_hf_dict(
        dict(
            model_type="qwen3",
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=tied,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            rope_theta=10000.0,
            max_position_embeddings=256,
        )
    )
    return Decoder(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))


def tiny_model() -> Decoder:
    """small_qwen3 over a 64-token vocabulary, untied: the update-step tests' policy."""
    return small_qwen3(64, tied=False)


def randomize_adapters(model, seed=1, std=0.1):
    """Every `nnx.LoRAParam` of `model` drawn from N(0, std^2) (fresh adapters are the base)."""
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        key = jax.random.fold_in(jax.random.key(seed), i)
        var.set_value(std * jax.random.normal(key, var.shape, var.dtype))


@jax.jit
def state_logits(graphdef, state, ids, mask):
    """Logits of the model `graphdef` with parameters `state` (one jitted call)."""
    return nnx.merge(graphdef, state)(ids, mask)


def logits(model, ids, mask):
    """The model's logits through one jitted call (eager op-by-op runs are slow on CPU)."""
    return state_logits(*nnx.split(model), ids, mask)
