"""The samplers on a data=2 x fsdp=2 x tensor=2 mesh of 8 fake CPU devices, the parameters
sharded by the logical-axis rules: `generate` (one engine per batch shard; and the static sampler)
gives the same greedy tokens and log-probs as on one device (and the same sampled tokens: each
row's key is fold_in(rng, row), independent of the layout), also when the prompts do not fill the
shards evenly (6 prompts, and 3 prompts x n=2 on 4 shards, and when idle shards steal waiting
rows); its outputs are split over the batch, and so is the compiled program's KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import left_padded_batch, random_decoder

from htpo_jax import rollout
from htpo_jax.infra.sharding import make_mesh, shard_model
from htpo_jax.rollout import EngineConfig, generate


@pytest.mark.slow  # ~100 s on a loaded 2-core box
def test_sharded_generation_matches_one_device():
    assert jax.device_count() == 8, jax.devices()
    ids, mask = left_padded_batch(5, b=8, t=11)  # 8 rows: 2 per batch shard
    kw = dict(max_new_tokens=10, eos_token_id=[7, 11])
    reference = random_decoder("qwen3", False)
    ref_greedy = generate(reference, ids, mask, greedy=True, **kw)
    ref_sample = generate(reference, ids, mask, rng=jax.random.key(2), top_p=0.95, **kw)
    ref_six = generate(reference, ids[:6], mask[:6], greedy=True, **kw)
    ref_n = generate(reference, ids[:3], mask[:3], n=2, rng=jax.random.key(4), **kw)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = shard_model(random_decoder("qwen3", False), mesh)
    q = model.layers.self_attn.q_proj.kernel[...]  # [L, D, N, H]
    assert q.sharding.spec == jax.P(None, "fsdp", "tensor", None), q.sharding
    stats = {}
    with jax.set_mesh(mesh):
        greedy = generate(model, ids, mask, greedy=True, stats=stats, **kw)  # the engine
        static = generate(model, ids, mask, greedy=True, engine="static", **kw)
        sample = generate(model, ids, mask, rng=jax.random.key(2), top_p=0.95, **kw)
        six = generate(model, ids[:6], mask[:6], greedy=True, **kw)  # 2 padding rows added
        n2 = generate(model, ids[:3], mask[:3], n=2, rng=jax.random.key(4), **kw)  # 3 x 2 rows
        # 2 slots and 2 steps a call per shard, 1 in 8 tokens ends a row: queues drain
        # unevenly, idle shards steal.
        small = EngineConfig(max_num_seqs=8, steps_per_call=2)
        kw_steal = dict(max_new_tokens=10, eos_token_id=list(range(3, 128, 8)))
        stole, kept = {}, {}
        steal = generate(model, ids, mask, n=4, rng=jax.random.key(6), engine=small, stats=stole,
                         **kw_steal)  # fmt: skip
        no_steal = dataclasses.replace(small, work_stealing=False)
        plain = generate(model, ids, mask, n=4, rng=jax.random.key(6), engine=no_steal,
                         stats=kept, **kw_steal)  # fmt: skip
    ref_steal = generate(reference, ids, mask, n=4, rng=jax.random.key(6), **kw_steal)

    assert stats["shards"] == 4, stats  # one engine per batch shard (data x fsdp)
    assert greedy.tokens.sharding.spec[0] == ("data", "fsdp"), greedy.tokens.sharding
    assert static.tokens.sharding.spec[0] == ("data", "fsdp"), static.tokens.sharding
    np.testing.assert_array_equal(np.asarray(static.tokens), np.asarray(ref_greedy.tokens))
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(ref_greedy.tokens))
    np.testing.assert_array_equal(np.asarray(greedy.lengths), np.asarray(ref_greedy.lengths))
    np.testing.assert_allclose(np.asarray(greedy.log_probs), ref_greedy.log_probs, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sample.tokens), np.asarray(ref_sample.tokens))
    np.testing.assert_allclose(np.asarray(sample.log_probs), ref_sample.log_probs, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(six.tokens), np.asarray(ref_six.tokens))
    np.testing.assert_array_equal(np.asarray(n2.tokens), np.asarray(ref_n.tokens))
    for out in (steal, plain):  # work stealing moves rows between shards, not their tokens
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref_steal.tokens))
        np.testing.assert_allclose(np.asarray(out.log_probs), ref_steal.log_probs, atol=1e-5)
    assert stole["stolen_rows"] > 0 and kept["stolen_rows"] == 0, (stole, kept)
    print("work stealing:", stole["stolen_rows"], "rows moved;", stole["rounds"], "rounds, not",
          kept["rounds"])  # fmt: skip

    # The KV cache is split too: compile (not run) a long generation and compare the per-device
    # temporary memory with one device's. Cache: 2 layers x (k, v) x [8, 16 + 4096, 2, 16] f32
    # = 16.8 MB on one device; batch over 4 and kv heads over 2 leaves 2.1 MB per device.
    def temp_bytes(m):
        static = (1, 4096, True, -1, False, (), 0, jnp.dtype(jnp.float32), True)  # unrolled (CPU)
        graph, state = rollout.StaticGraph(nnx.graphdef(m)), nnx.state(m)
        pad = ((0, 0), (5, 0))  # 11 -> 16 columns, as generate pads them
        args = (np.pad(ids, pad), np.pad(mask, pad).astype(np.int32), jax.random.key(0))
        fn = rollout.static.generate_program
        return fn.lower(graph, static, state, *args, jnp.float32(1), jnp.float32(1)).compile()

    one = temp_bytes(reference).memory_analysis().temp_size_in_bytes
    with jax.set_mesh(mesh):
        split = temp_bytes(model).memory_analysis().temp_size_in_bytes
    assert one > 16e6 and split < one / 4, (one, split)
