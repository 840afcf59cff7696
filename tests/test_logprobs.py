"""Chunked log-prob / entropy against a direct log-softmax: values, gradients, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import random_decoder

from htpo_jax.models.logprobs import chunked_logprobs_and_entropy, logprobs_and_entropy


def direct(model, ids, mask, temperature):
    """The [B, T, V] reference: full logits, log_softmax, gather."""
    z = model(ids, mask)[:, :-1] / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return target, -(jnp.exp(logp) * logp).sum(-1)


@pytest.fixture(scope="module")
def batch():
    ids = jax.random.randint(jax.random.key(1), (3, 13), 0, 128)
    mask = jnp.ones((3, 13), bool).at[0, :4].set(False)
    return ids, mask


@pytest.mark.parametrize(
    "chunk_size,temperature,tied",
    [(5, 0.7, False), pytest.param(64, 1.3, True, marks=pytest.mark.slow)],  # ~27 s loaded
)
def test_values_and_gradients_match_direct(batch, chunk_size, temperature, tied):
    ids, mask = batch
    model = random_decoder("qwen3", tied)
    weights = jnp.linspace(-1.0, 2.0, ids.shape[1] - 1)  # position weights: a non-trivial loss

    def chunked_loss(m):
        lp, ent = logprobs_and_entropy(m, ids, mask, temperature=temperature, chunk_size=chunk_size)
        return (lp * weights).sum(), (lp, ent)

    def direct_loss(m):
        lp, ent = direct(m, ids, mask, temperature)
        return (lp * weights).sum(), (lp, ent)

    g1, (lp1, ent1) = nnx.jit(nnx.grad(chunked_loss, has_aux=True))(model)
    g2, (lp2, ent2) = nnx.jit(nnx.grad(direct_loss, has_aux=True))(model)
    assert lp1.shape == ent1.shape == (3, 12) and lp1.dtype == jnp.float32
    np.testing.assert_allclose(lp1, lp2, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ent1, ent2, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_entropy_carries_no_gradient():
    h = jax.random.normal(jax.random.key(0), (2, 7, 8))
    w = jax.random.normal(jax.random.key(1), (8, 32))
    y = jnp.zeros((2, 7), jnp.int32)
    g = jax.grad(lambda h, w: chunked_logprobs_and_entropy(h, w, y, chunk_size=3)[1].sum(), (0, 1))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in g(h, w))


def test_hand_computed_uniform_logits():
    """Zero logits over V tokens: log-prob = -log V, entropy = log V, at any temperature."""
    v = 16
    lp, ent = chunked_logprobs_and_entropy(
        jnp.zeros((1, 5, 4)),
        jnp.ones((4, v)),
        jnp.arange(5)[None] % v,
        temperature=0.5,
        chunk_size=2,
    )
    np.testing.assert_allclose(lp, -np.log(v) * np.ones((1, 5)), rtol=1e-6)
    np.testing.assert_allclose(ent, np.log(v) * np.ones((1, 5)), rtol=1e-6)


def _temp_bytes(t, *, vocab=8192, hidden=32, batch=2, chunk=64):
    """Compiled temp memory of forward + backward through the chunked log-probs."""
    shapes = (
        jax.ShapeDtypeStruct((batch, t, hidden), jnp.float32),
        jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, t), jnp.int32),
    )
    loss = lambda h, w, y: chunked_logprobs_and_entropy(h, w, y, chunk_size=chunk)[0].sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_peak_memory_does_not_grow_as_t_times_v():
    small, large = _temp_bytes(512), _temp_bytes(1024)
    logits_growth = 2 * 512 * 8192 * 4  # what [B, T, V] float32 logits would add
    assert large - small < 0.05 * logits_growth
    assert large < 0.5 * logits_growth  # and the total is far below one full logits array
