"""Every attention implementation that runs on CPU (xla, chunked, splash in Pallas interpret
mode, the cuDNN path's padding rotation through XLA) against the reference: values and
gradients, with left and right padding and grouped-query heads; and `auto`'s choices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import left_padded_batch, random_decoder

from htpo_jax.infra.sharding import make_mesh
from htpo_jax.models import attention as A

B, T, N, K, H = 2, 24, 4, 2, 16  # GQA: 2 query heads per kv head


@pytest.fixture(scope="module")
def qkv():
    r = np.random.RandomState(0)
    q = jnp.asarray(r.randn(B, T, N, H), jnp.float32)
    k = jnp.asarray(r.randn(B, T, K, H), jnp.float32)
    v = jnp.asarray(r.randn(B, T, K, H), jnp.float32)
    mask = np.ones((B, T), bool)
    mask[0, :5] = False  # a left-padded prompt
    mask[1, :2] = False
    mask[1, -3:] = False  # ... and a response padded on the right
    mask = jnp.asarray(mask)
    # Loss weights: zero at padding positions, whose outputs are undefined.
    w = jnp.asarray(r.randn(B, T, N, H), jnp.float32) * mask[:, :, None, None]
    return q, k, v, mask, w


def value_and_grads(fn, qkv):
    q, k, v, mask, w = qkv
    loss = lambda q, k, v: (fn(q, k, v, mask) * w).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def reference(q, k, v, mask):
    """Direct softmax attention in float64-free numpy-style jnp: causal, padding keys masked."""
    g = N // K
    k_full, v_full = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # head n <- kv n // G
    scores = jnp.einsum("btnh,bsnh->bnts", q, k_full) / np.sqrt(H)
    allowed = jnp.tril(jnp.ones((T, T), bool))[None, None] & mask[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v_full)


IMPLS = {
    "xla": lambda q, k, v, m: A.self_attention(q, k, v, m, impl="xla"),
    "chunked": lambda q, k, v, m: A.self_attention(q, k, v, m, impl="chunked", chunk_size=5),
    "splash": lambda q, k, v, m: A.self_attention(q, k, v, m, impl="splash"),
    "cudnn_rotation": lambda q, k, v, m: A.cudnn_self_attention(q, k, v, m, implementation="xla"),
}
# The Pallas interpreter takes tens of seconds on 2 busy cores.
SLOW = {"splash"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in IMPLS]
)
def test_values_and_gradients_match_reference(qkv, name):
    ref_loss, ref_grads = value_and_grads(reference, qkv)
    loss, grads = value_and_grads(IMPLS[name], qkv)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert float(jnp.abs(r).max()) > 0.1
        np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()))
    out = IMPLS[name](*qkv[:4])
    assert bool(jnp.isfinite(out).all())  # padding rows too


@pytest.mark.slow
def test_splash_under_a_mesh_uses_shard_map(qkv, monkeypatch):
    q, k, v, mask, _ = qkv
    calls = []
    shard_map = jax.shard_map
    monkeypatch.setattr(jax, "shard_map", lambda f, **kw: calls.append(kw) or shard_map(f, **kw))
    with jax.set_mesh(make_mesh(data=1, fsdp=-1, tensor=1)):
        out = jax.jit(A.splash_self_attention)(q, k, v, mask)
    assert calls and calls[0]["in_specs"][0][0] is not None  # the batch is split over the mesh
    real = np.asarray(mask)
    np.testing.assert_allclose(
        np.asarray(out)[real], np.asarray(reference(q, k, v, mask))[real], atol=1e-5
    )


def test_auto_picks_by_platform_dtype_and_length():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert A.resolve_impl("auto", 128, bf16, None, "tpu") == "splash"
    assert A.resolve_impl("auto", 128, bf16, None, "gpu") == "cudnn"
    assert A.resolve_impl("auto", 4096, f32, None, "gpu") == "chunked"  # cuDNN: bf16/fp16 only
    assert A.resolve_impl("auto", 2048, f32, None, "cpu") == "xla"
    assert A.resolve_impl("auto", 2049, f32, None, "cpu") == "chunked"
    assert A.resolve_impl("auto", 600, f32, 512, "cpu") == "chunked"
    assert A.resolve_impl("xla", 10**6, bf16, None, "tpu") == "xla"  # explicit names are kept
    with pytest.raises(ValueError, match="flash.*choose one of"):
        A.resolve_impl("flash", 8, f32, None, "cpu")


@pytest.mark.slow
def test_decoder_with_splash_matches_xla():
    """The decoder wiring (chunked is covered in test_models with remat)."""
    ids, mask = left_padded_batch(3, b=2, t=12)
    ref = np.asarray(random_decoder("qwen3", False, attention_impl="xla")(ids, mask))
    model = random_decoder("qwen3", False, attention_impl="splash")
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda i, m: model(i, m))(ids, mask))[mask], ref[mask], atol=2e-5
    )
