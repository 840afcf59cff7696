"""The decoder on a data=2 x fsdp=2 x tensor=2 mesh of 8 fake CPU devices: parameters loaded with
`from_pretrained(mesh=...)` and moved with `shard_model` are really sharded as the rules say; the
sharded forward, KV-cache prefill and log-prob gradients equal the unsharded ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import left_padded_batch, random_decoder

from htpo_jax.infra.sharding import make_mesh, shard_model
from htpo_jax.models.decoder import positions_from_mask
from htpo_jax.models.hf_io import from_pretrained, save_pretrained
from htpo_jax.models.logprobs import logprobs_and_entropy


@pytest.mark.slow  # ~40 s on a loaded 2-core box
def test_sharded_model_matches_unsharded(tmp_path):
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = random_decoder("qwen3", False)
    ids, mask = left_padded_batch(0, b=4, t=12)
    loss = lambda m: logprobs_and_entropy(m, ids, mask, chunk_size=4)[0].sum()
    ref_logits = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask))
    ref_grads = jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))

    save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    loaded = from_pretrained(tmp_path, dtype=jnp.float32, mesh=mesh)
    moved = shard_model(random_decoder("qwen3", False), mesh)

    for m in (loaded, moved):
        q = m.layers.self_attn.q_proj.kernel[...]  # [L=2, D=64, N=4, H=16]
        assert q.sharding.spec == jax.P(None, "fsdp", "tensor", None), q.sharding
        assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
        up = m.layers.mlp.up_proj.kernel[...]  # [L, D, F]
        assert up.sharding.spec == jax.P(None, "fsdp", "tensor"), up.sharding
        emb = m.embed_tokens[...]
        assert emb.sharding.spec == jax.P("tensor", "fsdp"), emb.sharding
        assert m.norm.scale[...].sharding.is_fully_replicated

    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, i, k: m(i, k))(loaded, ids, mask)
        assert not logits.sharding.is_fully_replicated, logits.sharding
        grads = jax.tree.leaves(nnx.jit(nnx.grad(loss))(loaded))

        @nnx.jit
        def prefill(m, ids):
            cache = m.init_cache(4, 16, jnp.float32)
            kv_mask = jnp.zeros((4, 16), bool).at[:, :12].set(mask)
            hidden, _ = m.forward_cached(ids, positions_from_mask(mask), cache, 0, kv_mask)
            return m.unembed(hidden)

        cached_logits = prefill(loaded, ids)

    np.testing.assert_allclose(np.asarray(logits)[mask], ref_logits[mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(cached_logits)[mask], ref_logits[mask], atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sharded_qlora_base_is_quantized_on_its_shards(tmp_path):
    """An nf4 QLoRA base on the mesh: the codes shard exactly like the kernels they replace, the
    scales along the same axes, and the sharded forward equals the unsharded one."""
    from htpo_jax.models import lora

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    spec = lora.LoraSpec(rank=4, base_dtype="nf4", block_size=32)
    ref = random_decoder("qwen3", False)
    lora.add_adapters(ref, spec)
    ids, mask = left_padded_batch(0, b=4, t=12)
    ref_logits = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(ref, ids, mask))

    model = shard_model(random_decoder("qwen3", False), mesh)
    lora.add_adapters(model, spec, mesh=mesh)
    q = model.layers.self_attn.q_proj
    assert q.kernel_codes[...].sharding.spec == jax.P(None, "fsdp", "tensor", None)
    assert q.kernel_codes[...].addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert q.kernel_scale[...].shape == (2, 2, 4, 16)  # [L, 64 / 32 blocks, N, H]
    assert q.kernel_scale[...].sharding.spec == jax.P(None, "fsdp", "tensor", None)
    codes = lambda m: np.asarray(m.layers.self_attn.q_proj.kernel_codes[...]).astype(int)
    np.testing.assert_array_equal(codes(model), codes(ref))
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask)
    np.testing.assert_allclose(np.asarray(logits)[mask], ref_logits[mask], atol=1e-5)
