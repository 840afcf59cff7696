"""Per-token log-probs and entropies of a sequence, without ever holding [B, T, V] logits.

For token positions t = 0 .. T-2, with logits z_t = (h_t W) / tau (h_t the final-normed hidden
state, W the unembedding [D, V], tau the sampling temperature):

    log_prob[b, t] = log softmax(z_t)[x_{t+1}] = z_t[x_{t+1}] - logsumexp(z_t)
    entropy[b, t]  = -sum_v p_t(v) log p_t(v) = logsumexp(z_t) - sum_v p_t(v) z_t(v)

The sequence is cut into chunks of `chunk_size` positions; `lax.map` runs one chunk at a time and
`jax.checkpoint` on the chunk body makes the backward pass recompute each chunk's logits instead of
saving them, so peak memory grows with B * chunk_size * V, not B * T * V. Softmax math is float32.
Entropy is returned under `stop_gradient` (it is a diagnostic / token selector, not a loss term).

Under a mesh the unembedding [D, V] is resharded to split the VOCABULARY over every model-parallel
axis (`unembed_vocab`: tensor x fsdp) and each chunk's hidden states are gathered over `fsdp`
(`act_batch_data`): each chip computes the logits of all the fsdp group's tokens for its slice of
the vocabulary (logsumexp and the target's logit are reduced across chips). So neither the table
nor its gradient is ever held whole on a chip; the gradient stays a [D, V / shards] slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from htpo_jax.infra.sharding import constrain


def chunked_logprobs_and_entropy(
    hidden_btd: jax.Array,
    unembed_dv: jax.Array,
    targets_bt: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """(log_prob [B, T], entropy [B, T]) of `targets_bt` under logits `hidden_btd @ unembed_dv`."""
    b, t, d = hidden_btd.shape
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    h = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    h = h.reshape(b, n, c, d).swapaxes(0, 1)  # [n, B, C, D]
    y = y.reshape(b, n, c).swapaxes(0, 1)  # [n, B, C]
    w_dv = constrain(unembed_dv.astype(hidden_btd.dtype), (None, "unembed_vocab"))

    @jax.checkpoint
    def chunk(xs):
        h_bcd, y_bc = xs
        h_bcd = constrain(h_bcd, ("act_batch_data", None, None))  # one chunk gathered at a time
        y_bc = constrain(y_bc, ("act_batch_data", None))
        z_bcv = jnp.einsum("bcd,dv->bcv", h_bcd, w_dv, preferred_element_type=jnp.float32)
        z_bcv = constrain(z_bcv, ("act_batch_data", None, "unembed_vocab"))
        z_bcv = z_bcv / jnp.float32(temperature)
        lse_bc = jax.nn.logsumexp(z_bcv, axis=-1)
        z_target = jnp.take_along_axis(z_bcv, y_bc[..., None], axis=-1)[..., 0]
        p_bcv = jnp.exp(z_bcv - lse_bc[..., None])
        entropy = lse_bc - jnp.sum(p_bcv * z_bcv, axis=-1)
        return z_target - lse_bc, jax.lax.stop_gradient(entropy)

    log_prob, entropy = jax.lax.map(chunk, (h, y))  # each [n, B, C]
    log_prob = log_prob.swapaxes(0, 1).reshape(b, n * c)[:, :t]  # [B, T]
    entropy = entropy.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    return log_prob, entropy


def logprobs_and_entropy(
    model,
    input_ids_bt: jax.Array,
    attention_mask_bt: jax.Array | None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """(log_prob, entropy), each float32 [B, T-1]: log p(x_{t+1} | x_<=t) and H(p_t).

    `model` is a `Decoder` (anything with `hidden_states(ids, mask)` and `unembed_weight()`).
    Values at positions whose next token is padding are meaningless: mask them.
    """
    hidden_btd = model.hidden_states(input_ids_bt, attention_mask_bt)  # [B, T, D]
    return chunked_logprobs_and_entropy(
        hidden_btd[:, :-1],
        model.unembed_weight(),
        input_ids_bt[:, 1:],
        temperature=temperature,
        chunk_size=chunk_size,
    )
