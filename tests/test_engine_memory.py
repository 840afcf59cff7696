"""The engine's page pool is sized from what the call can use, within a fixed budget: on CPU
never more than `cpu_kv_budget_gib` (the old pool took half the host's free RAM, and evaluate of
the shipped model grew to 22 GB); a pool that cannot fit is one line naming the keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import left_padded_batch, random_decoder

from htpo_jax.rollout import EngineConfig, engine, generate
from htpo_jax.rollout import paged_attention as pa

GIB = 2**30


def test_budget_is_a_share_of_the_device_and_capped_on_cpu():
    cfg = EngineConfig(kv_memory_fraction=0.5, cpu_kv_budget_gib=2.0)
    # CPU: a machine with 20 GiB free gets 2 GiB, not 10.
    assert engine.kv_budget_bytes(cfg, 24 * GIB, 20 * GIB, on_cpu=True) == 2 * GIB
    # An accelerator: half of the device's memory, and never more than half of what is free.
    assert engine.kv_budget_bytes(cfg, 96 * GIB, 96 * GIB, on_cpu=False) == 48 * GIB
    assert engine.kv_budget_bytes(cfg, 96 * GIB, 40 * GIB, on_cpu=False) == 20 * GIB


def test_pool_pages_within_the_budget_and_what_the_call_uses():
    cfg = EngineConfig()
    # What the call uses (rounded up to a power of two) when that fits the budget.
    assert engine.pool_pages(cfg, 1000, 300, 10, budget=10**9, free=10**10) == 512
    # The budget caps it (but a pool always holds one row at full length).
    assert engine.pool_pages(cfg, 1000, 300, 10, budget=100_000, free=10**10) == 100
    with pytest.raises(ValueError) as e:  # one row does not fit the budget
        engine.pool_pages(cfg, 1000, 300, 10, budget=5_000, free=10**10)
    msg = str(e.value)
    assert "\n" not in msg
    for key in ("rollout.max_response_length", "rollout.kv_memory_fraction",
                "rollout.cpu_kv_budget_gib"):  # fmt: skip
        assert key in msg
    with pytest.raises(ValueError, match="rollout.num_pages=99 needs .* lower rollout.num_pages"):
        engine.pool_pages(EngineConfig(num_pages=99), 1000, 300, 10, budget=0, free=50_000)


def test_resolve_sizes_on_cpu_takes_at_most_the_budget():
    """The evaluate case: 320 rows of the paper's 20,480 new tokens on a small model wanted a
    pool of many GiB; now the pool stays within cpu_kv_budget_gib."""
    m = random_decoder("qwen3", False).cfg
    dtype = jnp.dtype(jnp.float32)
    per_page = pa.page_bytes(m.num_layers, 16, m.num_kv_heads, m.head_dim, dtype.itemsize)
    for gib in (2.0, 0.25):
        cfg = EngineConfig(cpu_kv_budget_gib=gib)
        sizes = engine.resolve_sizes(cfg, m, [20] * 40, 8, 20480, dtype)
        want = 512 * (-(-(19 + 20480) // 16) + 1) * per_page  # 512 rows at full length
        assert want > 4 * GIB
        assert sizes.pages * per_page <= gib * GIB
        assert sizes.window_pages * per_page <= cfg.window_memory_fraction * gib * GIB


def test_plan_sizes_is_the_rule_on_given_memory():
    """`plan_sizes` reads no memory: the same inputs give the same sizes, the budget follows the
    given memory, CPU shards share the host's budget, and the window share is a config key."""
    m = random_decoder("qwen3", False).cfg
    dtype = jnp.dtype(jnp.float32)
    per_page = pa.page_bytes(m.num_layers, 16, m.num_kv_heads, m.head_dim, dtype.itemsize)
    plan = lambda cfg, **kw: engine.plan_sizes(cfg, m, [20] * 40, 8, 20480, dtype, **kw)
    gpu = dict(total_bytes=80 * GIB, free_bytes=40 * GIB, backend="gpu")
    sizes = plan(EngineConfig(), **gpu)
    assert sizes == plan(EngineConfig(), **gpu)
    assert sizes.seqs == 320 and sizes.pages * per_page <= 20 * GIB  # half of what is free
    assert sizes.window_pages == int(0.25 * 20 * GIB) // per_page
    assert (
        plan(EngineConfig(window_memory_fraction=0.5), **gpu).window_pages
        == int(0.5 * 20 * GIB) // per_page
    )
    cpu = dict(total_bytes=24 * GIB, free_bytes=20 * GIB, backend="cpu")
    one, four = plan(EngineConfig(), **cpu), plan(EngineConfig(), shards=4, **cpu)
    assert one.pages * per_page <= 2 * GIB and four.pages * per_page <= GIB // 2
    with pytest.raises(ValueError, match="^compile_check: one response"):
        small = 64 * per_page  # under one row at full length (1282 pages)
        plan(EngineConfig(), total_bytes=small, free_bytes=small, backend="tpu",
             where="compile_check")  # fmt: skip


def test_generate_pool_stays_within_a_small_budget():
    """End to end: a call that could use more pages than the budget runs in the budget's pool
    (preempting as it must) and gives the same tokens as with an unbounded pool."""
    model = random_decoder("qwen3", False)
    ids, mask = left_padded_batch(3, b=3, t=11)
    args = dict(max_new_tokens=24, n=4, rng=jax.random.key(2), temperature=1.0)
    c = model.cfg
    per_page = pa.page_bytes(c.num_layers, 4, c.num_kv_heads, c.head_dim, 4)
    small, big = {}, {}
    budget_gib = 24 * per_page / GIB  # room for 24 pages; the call could use 12 rows x 10
    out = generate(model, ids, mask, engine=EngineConfig(page_size=4, cpu_kv_budget_gib=budget_gib),
                   stats=small, **args)  # fmt: skip
    ref = generate(model, ids, mask, engine=EngineConfig(page_size=4), stats=big, **args)
    assert small["pool_bytes"] <= budget_gib * GIB < big["pool_bytes"]
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    with pytest.raises(ValueError, match="one response at full length needs"):
        generate(model, ids, mask, engine=EngineConfig(page_size=4, cpu_kv_budget_gib=1e-9),
                 **args)  # fmt: skip
