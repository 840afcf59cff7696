"""The paged engine: same outputs as the static sampler, independent of slots / admission order /
page size / steps per call / preemption; page sharing and reuse; paged attention against dense
attention and against jax's reference of the TPU kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import left_padded_batch, random_decoder

from htpo_jax.models.attention import attend_one_query
from htpo_jax.rollout import EngineConfig, compile_count, generate
from htpo_jax.rollout import paged_attention as pa
from htpo_jax.rollout.scheduler import PageAllocator, Scheduler, _Row, steal_work


@pytest.fixture(scope="module")
def prompts():
    """Overrides conftest's prompts: seed 3, 11 columns."""
    ids, mask = left_padded_batch(3, b=3, t=11)  # rows 0 and 1 are left padded
    return ids, mask


def assert_same(a, b, atol=1e-5):
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
    np.testing.assert_array_equal(np.asarray(a.finished), np.asarray(b.finished))
    np.testing.assert_array_equal(np.asarray(a.response_mask), np.asarray(b.response_mask))
    np.testing.assert_allclose(np.asarray(a.log_probs), np.asarray(b.log_probs), atol=atol)


@pytest.mark.parametrize(
    "kw",
    [
        dict(greedy=True),  # the quick suite's case; the others with the slow tests (~25 s each)
        pytest.param(dict(temperature=0.9, top_p=0.8, top_k=30), marks=pytest.mark.slow),
        pytest.param(dict(temperature=1.2), marks=pytest.mark.slow),
    ],
)
def test_engine_equals_static_sampler(model, prompts, kw):
    """Same rng, same rows: the engine and the dense reference sample the same tokens."""
    ids, mask = prompts
    args = dict(max_new_tokens=13, n=3, rng=jax.random.key(8), pad_token_id=1, **kw)
    ref = generate(model, ids, mask, engine="static", **args)
    eos = [int(ref.tokens[0, 3]), int(ref.tokens[4, 8])]  # end some rows early
    ref = generate(model, ids, mask, engine="static", eos_token_id=eos, **args)
    ours = generate(model, ids, mask, eos_token_id=eos, engine=EngineConfig(page_size=4), **args)
    assert_same(ours, ref)
    assert int(ref.lengths.min()) < 13 and int(ref.lengths.max()) == 13


def test_engine_on_looped_layers(prompts):
    """A model with unstacked layers (scan_layers=False) runs the same unrolled decode loop."""
    looped = random_decoder("qwen3", False, scan_layers=False)
    ids, mask = prompts
    args = dict(max_new_tokens=6, n=2, rng=jax.random.key(3), temperature=1.0)
    ref = generate(looped, ids, mask, engine="static", **args)
    assert_same(generate(looped, ids, mask, engine=EngineConfig(page_size=4), **args), ref)


def test_windows_over_the_memory_budget_are_gathered_every_step(model, prompts, monkeypatch):
    """With no memory for once-per-call windows the decode loop gathers a layer's pages in every
    step: same rows. Also with the layers scanned over stacked arrays (the non-CPU form)."""
    from htpo_jax.rollout import engine

    seen = []
    decode = engine._Programs.decode

    def spy(self, gather_once, *args):
        seen.append(gather_once)
        return decode(self, gather_once, *args)

    ids, mask = prompts
    args = dict(max_new_tokens=7, n=2, rng=jax.random.key(4), temperature=1.0)
    ref = generate(model, ids, mask, engine="static", **args)
    monkeypatch.setattr(engine._Programs, "decode", spy)
    ours = generate(model, ids, mask, engine=EngineConfig(page_size=4), **args)
    no_windows = EngineConfig(page_size=4, window_memory_fraction=0.0)
    per_step = generate(model, ids, mask, engine=no_windows, **args)
    assert seen and seen[0] and not seen[-1]
    assert_same(ours, ref)
    assert_same(per_step, ref)
    # Scanned layers over stacked windows / buffers (a GPU's form when the per-layer weights
    # would not fit), both window paths.
    scanned_cfg = EngineConfig(page_size=4, unroll_layers=False, window_memory_fraction=0.0)
    scanned_per_step = generate(model, ids, mask, engine=scanned_cfg, **args)
    scanned_cfg = EngineConfig(page_size=4, unroll_layers=False, window_memory_fraction=1.0)
    scanned = generate(model, ids, mask, engine=scanned_cfg, **args)
    assert seen[-2:] == [False, True]
    assert_same(scanned_per_step, ref)
    assert_same(scanned, ref)


def test_unrolled_layers_by_backend_and_memory():
    """Unrolled on CPU always; on a GPU when the weights fit UNROLL_MEMORY_FRACTION of free
    memory; never on TPU; EngineConfig.unroll_layers overrides (through `plan_sizes`)."""
    from htpo_jax.rollout import engine

    gib = 2**30
    on = lambda backend, *args, **kw: engine.unroll_layers(*args, backend=backend, **kw)
    assert on("cpu", 100 * gib, gib)
    assert on("gpu", gib, 8 * gib) and not on("gpu", 3 * gib, 8 * gib)
    assert not on("tpu", 1, 8 * gib)
    assert not on("cpu", 1, gib, override=False)
    assert on("tpu", 100 * gib, gib, override=True)
    m = random_decoder("qwen3", False).cfg
    plan = lambda backend, cfg: engine.plan_sizes(
        cfg, m, [5], 1, 4, jnp.dtype(jnp.float32), total_bytes=gib, free_bytes=gib,
        backend=backend, weight_bytes=gib,
    ).unroll  # fmt: skip
    assert plan("cpu", EngineConfig()) and not plan("gpu", EngineConfig())
    assert not plan("cpu", EngineConfig(unroll_layers=False))
    assert plan("tpu", EngineConfig(unroll_layers=True))


@pytest.mark.parametrize(
    "cfg",
    [
        # slow: ~25-33 s each on a loaded 2-core box; the quick suite keeps the last one
        pytest.param(
            EngineConfig(max_num_seqs=1, page_size=4, steps_per_call=5, min_slots=1),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            EngineConfig(max_num_seqs=3, page_size=8, steps_per_call=1, min_slots=2),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            EngineConfig(max_num_seqs=5, page_size=16, steps_per_call=3), marks=pytest.mark.slow
        ),
        EngineConfig(max_num_seqs=16, page_size=2, steps_per_call=64),
    ],
)
def test_slots_admission_order_and_page_size_do_not_change_rows(model, prompts, cfg):
    """1 slot (rows one after another), 3 or 5 slots (rows admitted as others end), all at once:
    every row's tokens and log-probs are the same (prompt 11 tokens > page sizes 2, 4, 8)."""
    ids, mask = prompts
    kw = dict(max_new_tokens=10, n=2, rng=jax.random.key(5), temperature=1.0)
    free = generate(model, ids, mask, engine=EngineConfig(max_num_seqs=64), **kw)
    eos = [int(free.tokens[1, 2]), int(free.tokens[3, 6])]
    ref = generate(model, ids, mask, eos_token_id=eos, engine=EngineConfig(max_num_seqs=64), **kw)
    stats = {}
    out = generate(model, ids, mask, eos_token_id=eos, engine=cfg, stats=stats, **kw)
    assert_same(out, ref)
    assert stats["max_num_seqs"] == cfg.max_num_seqs
    if cfg.max_num_seqs == 1:
        assert stats["rounds"] >= int(np.ceil(np.asarray(ref.lengths) / 5).sum())


@pytest.mark.slow
def test_page_reuse_and_preemption_in_a_small_pool(model, prompts):
    """A pool that holds ~2 rows: pages are reused after rows end (and rows are preempted and
    recomputed when the pool runs dry); the output is unchanged."""
    ids, mask = prompts
    kw = dict(max_new_tokens=24, n=2, rng=jax.random.key(2), temperature=1.0)
    ref = generate(model, ids, mask, engine=EngineConfig(max_num_seqs=8), **kw)
    stats = {}
    # A row needs ceil((11 + 24) / 4) + 1 = 10 pages at most; 19 pages cannot hold 2 at full
    # length while 6 slots invite more: admissions wait for pages, preemption frees them.
    tight = EngineConfig(max_num_seqs=6, page_size=4, num_pages=19, steps_per_call=4)
    out = generate(model, ids, mask, engine=tight, stats=stats, **kw)
    assert_same(out, ref)
    assert stats["peak_pages"] <= 19
    used_if_no_reuse = 6 * 9  # 6 rows x 9 pages each, had nothing been returned
    assert stats["peak_pages"] < used_if_no_reuse
    assert stats["preemptions"] >= 1


def test_pool_too_small_is_a_clear_error(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="num_pages"):
        generate(model, ids, mask, max_new_tokens=40, greedy=True,
                 engine=EngineConfig(page_size=4, num_pages=5))  # fmt: skip


@pytest.mark.slow
def test_eos_on_the_first_token_and_max_new_tokens(model, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=7, greedy=True, pad_token_id=2)
    free = generate(model, ids, mask, **kw)
    first = int(free.tokens[1, 0])
    r = generate(model, ids, mask, eos_token_id=first, engine=EngineConfig(steps_per_call=3), **kw)
    assert int(r.lengths[1]) == 1 and bool(r.finished[1])
    np.testing.assert_array_equal(np.asarray(r.response_mask[1]), [1, 0, 0, 0, 0, 0, 0])
    assert (np.asarray(r.tokens[1, 1:]) == 2).all() and (np.asarray(r.log_probs[1, 1:]) == 0).all()
    for b in (0, 2):  # rows without that token run to max_new_tokens, unfinished
        if first not in np.asarray(free.tokens[b]).tolist():
            assert int(r.lengths[b]) == 7 and not bool(r.finished[b])
    assert not np.asarray(free.finished).any() and (np.asarray(free.lengths) == 7).all()


@pytest.mark.slow
def test_one_token_prompt_and_one_new_token(model):
    ids = np.array([[0, 0, 17], [3, 4, 5]])
    mask = np.array([[0, 0, 1], [1, 1, 1]])
    for n_new in (1, 5):
        ref = generate(model, ids, mask, max_new_tokens=n_new, greedy=True, engine="static")
        assert_same(generate(model, ids, mask, max_new_tokens=n_new, greedy=True), ref)


def test_no_recompile_within_buckets(model):
    ids, mask = left_padded_batch(6, b=4, t=9)
    cfg = EngineConfig(page_size=8)
    kw = dict(max_new_tokens=6, top_k=9, engine=cfg)  # a configuration of its own
    generate(model, ids, mask, rng=jax.random.key(0), **kw)
    before = compile_count()
    generate(model, ids[:3], mask[:3], rng=jax.random.key(1), temperature=0.5, **kw)
    generate(model, ids, mask, rng=jax.random.key(2), temperature=2.0, **kw)
    assert compile_count() == before


def test_n_samples_share_the_prompt_pages():
    """Prompt of 11 tokens, page size 4: tokens 0..9 fill 2 full pages and 2 tokens of a third.
    The 3 rows share the 2 full pages, each gets a private copy of the partial page (copy on
    write), and the prompt is prefilled once."""
    prompt = np.arange(1, 12, dtype=np.int32)
    s = Scheduler([prompt], n=3, max_new_tokens=6, page_size=4, num_pages=64, max_num_seqs=8,
                  steps_per_call=2)  # fmt: skip
    prefill, plan = s.plan()
    assert prefill.ids_bt.shape[0] == 1 and int(prefill.len_b[0]) == 10
    prompt_pages = [int(p) for p in prefill.page_table_bp[0, :3]]
    rows = plan.rows
    assert len(rows) == 3
    for r in rows:
        assert r.pages[:2] == prompt_pages[:2] and r.pages[2] != prompt_pages[2]
        assert r.kv_len == 10 and r.next_tok == 11
    assert len({r.pages[2] for r in rows}) == 3
    copies = {(int(a), int(b)) for a, b in zip(plan.copy_src_s, plan.copy_dst_s, strict=True) if b}
    assert copies == {(prompt_pages[2], r.pages[2]) for r in rows}
    assert [s.alloc.refs[p] for p in prompt_pages[:2]] == [4, 4]  # 3 rows + the prompt
    s.end_round()  # all rows admitted: the prompt lets go of its pages
    assert [s.alloc.refs[p] for p in prompt_pages] == [3, 3, 0]
    assert prompt_pages[2] in s.alloc.free


def test_page_allocator_reuses_pages():
    a = PageAllocator(5)  # pages 1..4
    x = a.alloc(3)
    assert sorted(x) == [1, 2, 3] and a.num_free == 1 and 0 not in x
    a.incref(x[:1])
    a.release(x)
    assert a.num_free == 3  # x[0] still referenced
    y = a.alloc(3)
    assert set(y) <= {2, 3, 4} and a.peak_used == 4
    with pytest.raises(RuntimeError, match="exhausted"):
        a.alloc(1)


def _random_pool(rng, pages, c, k, h):
    """(k, v) pages of one layer, each [L=1, pages, c, K, H]."""
    kv = rng.standard_normal((2, 1, pages, c, k, h))
    return jnp.asarray(kv[0], jnp.float32), jnp.asarray(kv[1], jnp.float32)


def test_paged_attention_matches_dense_attention():
    rng = np.random.RandomState(0)
    b, n, k, h, c = 3, 4, 2, 8, 4
    pool = _random_pool(rng, 12, c, k, h)
    table = np.array([[3, 7, 1, 0], [5, 0, 0, 0], [11, 2, 9, 4]], np.int32)
    kv_len = np.array([9, 1, 16], np.int32)
    q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.float32)
    out = pa.paged_attention_reference(q, pool, 0, table, kv_len)
    for i in range(b):
        k_i, v_i = (np.asarray(a)[0, table[i]].reshape(-1, k, h)[: kv_len[i]] for a in pool)
        dense = attend_one_query(q[i : i + 1, None], k_i[None], v_i[None],
                                 np.ones((1, 1, kv_len[i]), bool))  # fmt: skip
        np.testing.assert_allclose(out[i], dense[0, 0], atol=1e-5)
    # Extra table columns (a larger pages bucket) read nothing new.
    wide = np.pad(table, ((0, 0), (0, 4)), constant_values=6)
    np.testing.assert_allclose(
        pa.paged_attention_reference(q, pool, 0, wide, kv_len), out, atol=1e-6
    )


@pytest.mark.slow
def test_paged_attention_matches_jax_kernel_reference():
    """Against jax's own reference of the TPU ragged paged attention kernel (same pool layout)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ref_ragged_paged_attention,
    )

    rng = np.random.RandomState(1)
    b, n, k, h, c = 4, 4, 2, 16, 8
    pool = _random_pool(rng, 20, c, k, h)
    table = rng.permutation(np.arange(1, 20))[: b * 3].reshape(b, 3).astype(np.int32)
    kv_len = np.array([1, 8, 17, 24], np.int32)
    q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.float32)
    combined = pa.interleave_kv(pool[0][0], pool[1][0])  # the kernel's layout [pages, c, 2K, H]
    ref = ref_ragged_paged_attention(q, combined, jnp.asarray(kv_len), jnp.asarray(table),
                                     jnp.arange(b + 1, dtype=jnp.int32),
                                     jnp.array([b], jnp.int32), sm_scale=h**-0.5)  # fmt: skip
    out = pa.paged_attention_reference(q, pool, 0, table, kv_len)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_write_kv_in_both_layouts_and_recent_tokens():
    k = jnp.arange(12.0).reshape(2, 2, 3)
    v = -jnp.arange(12.0).reshape(2, 2, 3) - 1
    page, off = jnp.array([2, 0]), jnp.array([1, 1])
    (kv,) = pa.write_kv((jnp.zeros((2, 4, 2, 4, 3)),), 1, k, v, page, off)  # TPU layout
    np.testing.assert_array_equal(kv[1, 2, 1, 0::2], k[0])
    np.testing.assert_array_equal(kv[1, 2, 1, 1::2], v[0])
    assert float(jnp.abs(kv[0]).sum()) == 0 and float(jnp.abs(kv[1, 3]).sum()) == 0
    zeros = jnp.zeros((1, 4, 2, 2, 3))
    pk, pv = pa.write_kv((zeros, zeros), 0, k, v, page, off)
    np.testing.assert_array_equal(pk[0, 2, 1], k[0])
    np.testing.assert_array_equal(pv[0, 2, 1], v[0])
    # Attention over pooled + recent tokens == attention after writing the recent ones.
    rng = np.random.RandomState(2)
    pool = _random_pool(rng, 6, 4, 2, 8)
    table = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
    kv_len = np.array([5, 2], np.int32)
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    rk, rv = (jnp.asarray(rng.standard_normal((2, 3, 2, 8)), jnp.float32) for _ in range(2))
    window = pa.gather_window(pool, 0, table)  # keys [S, K, H, T], values [S, K, T, H]
    assert window[0].shape == (2, 2, 8, 12) and window[1].shape == (2, 2, 12, 8)
    recent = (rk.transpose(0, 2, 3, 1), rv.transpose(0, 2, 1, 3))
    out = pa.window_attention(q, window, jnp.asarray(kv_len), recent, jnp.arange(3) < 2)
    pos = kv_len[:, None] + np.arange(2)[None]  # the 2 real recent tokens' positions
    pages = np.take_along_axis(table, pos // 4, axis=1)
    written = pa.write_kv(pool, 0, rk[:, :2].reshape(4, 2, 8), rv[:, :2].reshape(4, 2, 8),
                          pages.reshape(-1), (pos % 4).reshape(-1))  # fmt: skip
    ref = pa.paged_attention_reference(q, written, 0, table, kv_len + 2)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_paged_attention_impl_choice():
    # The TPU kernel only on a TPU and for head sizes it takes (multiples of 128).
    assert pa.resolve_impl("auto", 128, "tpu") == "tpu"
    assert pa.resolve_impl("auto", 64, "tpu") == "reference"
    assert pa.resolve_impl("auto", 128, "cpu") == "reference"
    assert pa.resolve_impl("reference", 128, "tpu") == "reference"
    with pytest.raises(ValueError, match="impl"):
        pa.resolve_impl("flash", 128, "cpu")


def test_shard_schedulers_pack_at_common_buckets():
    """One scheduler per batch shard; each packs at the max of every shard's needs, so one
    compiled program serves all. A shard with fewer (or no) rows pads with inactive slots, and
    one whose rows are done keeps packing all-inactive rounds until every shard is done."""
    kw = dict(n=2, max_new_tokens=4, page_size=4, num_pages=64, max_num_seqs=16, steps_per_call=4)
    long = [np.arange(1, 14, dtype=np.int32)] * 3  # 3 prompts x 2 rows, 13 tokens
    short = [np.arange(1, 4, dtype=np.int32)]  # 1 prompt x 2 rows, 3 tokens
    scheds = [Scheduler(long, **kw), Scheduler(short, **kw), Scheduler([], **kw)]
    assert scheds[2].done
    for s in scheds:
        s.advance()
    needs = [s.needs() for s in scheds]
    assert needs[0] == (8, 4, 4, 16) and needs[1] == (2, 2, 1, 16) and needs[2][2] == 0
    common = tuple(int(x) for x in np.max(needs, axis=0))
    plans = [s.pack(*common) for s in scheds]
    for (prefill, dec), live in zip(plans, (6, 2, 0), strict=True):
        assert dec.page_table_sp.shape == (8, 4) and prefill.ids_bt.shape == (4, 16)
        assert int(dec.active_s.sum()) == live
    assert int(plans[1][0].len_b[0]) == 2 and not plans[1][0].len_b[1:].any()  # padding prompts
    assert not plans[2][0].len_b.any() and not plans[2][0].page_table_bp.any()  # trash page only
    tok = np.full((8, 4), 5, np.int32)  # no EOS: every row runs to max_new_tokens = 4
    for s, (_, dec) in zip(scheds, plans, strict=True):
        out = np.zeros((len(s.prompts) * 2, 4), np.int32)
        s.commit(dec, tok, (), out, np.zeros(out.shape, np.float32), np.zeros((8, 4), np.float32))
        s.end_round()
        assert s.done and (out == 5).all()


def _run_shards(scheds, lengths, stealing, eos=1):
    """The engine's host loop over shard schedulers, with a fake decode: row r samples token 5
    until its response index lengths[r] - 1, where it samples EOS. Returns (tokens, rounds)."""
    out = np.zeros((len(lengths), max(lengths)), np.int32)
    logp = np.zeros(out.shape, np.float32)
    rounds = 0
    while not all(s.done for s in scheds):
        if stealing:
            steal_work(scheds)
        for s in scheds:
            s.advance()
        common = tuple(int(x) for x in np.max([s.needs() for s in scheds], axis=0))
        for s in scheds:
            _, dec = s.pack(*common)
            k = s.k
            tok = np.full((common[0], k), 5, np.int32)
            for j, r in enumerate(dec.rows):
                at = lengths[r.row] - 1 - r.step
                if 0 <= at < k:
                    tok[j, at] = eos
            s.commit(dec, tok, (eos,), out, logp, np.zeros(tok.shape, np.float32))
            s.end_round()
        rounds += 1
    return out, rounds


def test_work_stealing_balances_shards_and_keeps_every_row():
    """Shard 0 draws the prompts with long responses. Without stealing the other shards idle
    through its tail (the same lockstep programs); with it they take its waiting rows, the run
    takes fewer rounds, every row's tokens are the same, and every page returns to its pool."""
    n, shards = 4, 4
    prompts = [np.arange(1, 14 + i, dtype=np.int32) for i in range(4 * shards)]  # 13-28 tokens
    lengths = [48 if r < 4 * n else 3 for r in range(len(prompts) * n)]  # shard 0: long rows
    kw = dict(page_size=4, num_pages=96, max_num_seqs=3, steps_per_call=4)
    runs = {}
    for stealing in (False, True):
        scheds = [Scheduler(prompts, n, 48, rows=range(d * 4 * n, (d + 1) * 4 * n), **kw)
                  for d in range(shards)]  # fmt: skip
        runs[stealing] = _run_shards(scheds, lengths, stealing)
        for s in scheds:
            assert s.alloc.num_free == 96 - 1 and not any(s.alloc.refs)
    (plain, r_plain), (stolen, r_stolen) = runs[False], runs[True]
    np.testing.assert_array_equal(plain, stolen)
    assert [int((row != 0).sum()) for row in stolen] == lengths
    assert r_stolen <= r_plain * 0.5, (r_stolen, r_plain)


def test_rows_given_away_release_their_prefilled_prompt():
    """A prompt prefilled for its first row, whose other rows are stolen, lets go of its pages
    at the end of the round (its admitted row keeps its own references)."""
    s = Scheduler([np.arange(1, 15, dtype=np.int32)], 2, 8, page_size=4, num_pages=32,
                  max_num_seqs=1, steps_per_call=4)  # fmt: skip
    s.advance()  # row 0: prefills 4 prompt pages (the last partial), row 1 waits
    assert s.free_slots == 0 and list(s.waiting) == [1] and s.prompts[0].pages is not None
    held = 32 - 1 - s.alloc.num_free
    thief = Scheduler([np.arange(1, 15, dtype=np.int32)], 2, 8, page_size=4, num_pages=32,
                      max_num_seqs=1, steps_per_call=4, rows=[])  # fmt: skip
    assert thief.done and steal_work([s, thief]) == 1
    assert list(thief.waiting) == [1] and not s.waiting and s.prompts[0].pages is None
    s.end_round()
    row0 = s.live[0]
    assert 32 - 1 - s.alloc.num_free == len(row0.pages) < held  # only row 0's pages are held
    assert all(s.alloc.refs[p] == 1 for p in row0.pages)


def test_packed_page_table_follows_a_growing_row():
    """Packing copies a row's pages from an int32 cache that converts only the appended tail."""
    r = _Row(row=0, prompt=0, pages=[3, 4], kv_len=0, next_tok=0)
    np.testing.assert_array_equal(r.page_array(), [3, 4])
    r.pages += [9, 10, 11]  # growth, as `advance` does it
    np.testing.assert_array_equal(r.page_array(), [3, 4, 9, 10, 11])
    for p in range(20, 40):  # past the cache's capacity, one page at a time
        r.pages.append(p)
        assert r.page_array()[-1] == p
    np.testing.assert_array_equal(r.page_array(), [3, 4, 9, 10, 11, *range(20, 40)])


def test_plans_are_pytrees_in_the_programs_argument_order():
    """A plan's leaves are its arrays in the order the programs take them; rows are metadata."""
    import jax

    from htpo_jax.rollout import scheduler
    from htpo_jax.rollout.engine import stack_plans

    arrays = [np.full((2,), i, np.int32) for i in range(len(scheduler.DECODE_ARRAYS))]
    a = scheduler.DecodePlan(["row"], *arrays)
    b = scheduler.DecodePlan([], *(x + 10 for x in arrays))
    leaves = jax.tree.leaves(a)
    assert [int(x[0]) for x in leaves] == list(range(len(arrays)))
    stacked = stack_plans([a, b])
    assert [x.shape for x in stacked] == [(2, 2)] * len(arrays)
    assert int(stacked[3][1, 0]) == 13
    p = scheduler.PrefillPlan(np.zeros((1, 4), np.int32), np.ones(1, np.int32), np.zeros((1, 1)))
    assert [x.shape for x in jax.tree.leaves(p)] == [(1, 4), (1,), (1, 1)]
