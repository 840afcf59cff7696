"""The samplers (the paged engine by default; the static one where named): the log-prob
contract with the trainer, EOS / mask / padding handling,
determinism and per-row randomness, one compile per shape bucket, sampling distributions against
the exact ones, greedy parity with transformers (sharding on 8 fake devices:
multidevice/test_sharded_rollout.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from tiny_models import left_padded_batch, random_decoder

from htpo_jax.models.logprobs import logprobs_and_entropy
from htpo_jax.rollout import (
    bucket,
    compile_count,
    full_sequences,
    generate,
    repeat_prompts,
    sample_logits,
    sampling,
)


def trainer_log_probs(model, ids, mask, r, temperature):
    """What the trainer computes: log p(response token) from the full-sequence forward."""
    full_ids, full_mask = full_sequences(ids, mask, r)
    lp, _ = logprobs_and_entropy(model, full_ids, full_mask, temperature=temperature)
    return np.asarray(lp[:, ids.shape[1] - 1 :])  # [B, N]: predictions of the response tokens


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7, top_p=0.9, top_k=20),
        pytest.param(dict(temperature=1.3), marks=pytest.mark.slow),
        pytest.param(dict(temperature=0.8, greedy=True), marks=pytest.mark.slow),
    ],
)
def test_log_probs_match_trainer(model, prompts, kw):
    ids, mask = prompts
    r = generate(model, ids, mask, max_new_tokens=9, rng=jax.random.key(3), eos_token_id=[5], **kw)
    assert r.tokens.shape == r.log_probs.shape == r.response_mask.shape == (3, 9)
    assert r.log_probs.dtype == jnp.float32
    ref = trainer_log_probs(model, ids, mask, r, kw["temperature"])
    m = np.asarray(r.response_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(r.log_probs)[m], ref[m], atol=1e-4)
    assert (np.asarray(r.log_probs)[~m] == 0).all()


def test_eos_mask_lengths_and_padding(model, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=12, rng=jax.random.key(7), temperature=1.0, pad_token_id=3)
    free = generate(model, ids, mask, **kw)  # no EOS: all rows run to the end
    assert (np.asarray(free.lengths) == 12).all() and not np.asarray(free.finished).any()
    tokens = np.asarray(free.tokens)
    # Two EOS ids: row 0 ends at its 3rd token, row 1 at its 6th; row 2 at whichever comes first.
    eos = [int(tokens[0, 2]), int(tokens[1, 5])]
    r = generate(model, ids, mask, eos_token_id=eos, **kw)
    for b in range(3):
        hits = np.flatnonzero(np.isin(tokens[b], eos))
        length = int(hits[0]) + 1 if hits.size else 12
        assert int(r.lengths[b]) == length and bool(r.finished[b]) == bool(hits.size)
        # Same randomness up to the end, then padding.
        np.testing.assert_array_equal(np.asarray(r.tokens[b, :length]), tokens[b, :length])
        assert (np.asarray(r.tokens[b, length:]) == 3).all()
        np.testing.assert_array_equal(np.asarray(r.response_mask[b]), np.arange(12) < length)
        np.testing.assert_allclose(r.log_probs[b, :length], free.log_probs[b, :length], atol=1e-6)
        assert (np.asarray(r.log_probs[b, length:]) == 0).all()
    assert int(r.lengths[0]) <= 3 and int(r.lengths[1]) <= 6


def test_same_rng_same_output_and_independent_samples(model, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=8, temperature=1.0)
    a = generate(model, ids, mask, rng=jax.random.key(0), n=4, **kw)
    b = generate(model, ids, mask, rng=jax.random.key(0), n=4, **kw)
    c = generate(model, ids, mask, rng=jax.random.key(1), n=4, **kw)
    assert a.tokens.shape == (12, 8)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    # The n samples of a prompt are different draws.
    groups = np.asarray(a.tokens).reshape(3, 4, 8)
    for g in groups:
        assert len({tuple(row) for row in g}) == 4
    # n=4 is the same as repeating the prompts by hand (rows i*n .. i*n+n-1 = prompt i).
    rep_ids, rep_mask = repeat_prompts(ids, mask, 4)
    d = generate(model, rep_ids, rep_mask, rng=jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(d.tokens))


@pytest.mark.slow
def test_rows_do_not_depend_on_batch_bucket_or_padding(model, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=6, rng=jax.random.key(5), temperature=0.9)
    full = generate(model, ids, mask, **kw)
    # Two rows only (the same batch bucket): the same rows.
    two = generate(model, ids[:2], mask[:2], **kw)
    np.testing.assert_array_equal(np.asarray(two.tokens), np.asarray(full.tokens[:2]))
    # Three more columns of left padding (the same length bucket): the same output.
    pad_ids = np.pad(ids, ((0, 0), (3, 0)), constant_values=9)
    pad_mask = np.pad(mask, ((0, 0), (3, 0)))
    padded = generate(model, pad_ids, pad_mask, **kw)
    np.testing.assert_array_equal(np.asarray(padded.tokens), np.asarray(full.tokens))
    np.testing.assert_allclose(padded.log_probs, full.log_probs, atol=1e-5)


@pytest.mark.slow
def test_compiles_once_per_bucket(model):
    """The static sampler: one program per bucket (the engine's: test_rollout_engine.py)."""
    ids, mask = left_padded_batch(1, b=5, t=13)
    kw = dict(max_new_tokens=5, rng=jax.random.key(0), top_k=7, engine="static")
    before = compile_count()
    generate(model, ids, mask, temperature=1.0, **kw)
    assert compile_count() == before + 1
    # Other batch sizes / prompt lengths in the same buckets (8 rows, 16 columns), another
    # temperature / top_p / rng: no retrace.
    generate(model, ids[:3, 2:], mask[:3, 2:], temperature=0.5, **kw)
    generate(model, ids[:4], mask[:4], temperature=2.0, **{**kw, "rng": jax.random.key(9)})
    generate(model, ids, mask, temperature=1.0, top_p=0.5, **kw)  # top_p on: one new program
    generate(model, ids, mask, temperature=0.7, top_p=0.9, **kw)
    assert compile_count() == before + 2
    # A new batch bucket compiles again.
    big_ids, big_mask = repeat_prompts(ids, mask, 2)  # 10 rows -> bucket 16
    generate(model, big_ids, big_mask, temperature=1.0, **kw)
    assert compile_count() == before + 3


@given(st.integers(1, 5000))
def test_bucket_properties(n):
    b = bucket(n)
    assert b >= n and b >= 8 and bucket(b) == b and bucket(n + 1) >= b
    assert b < 2 * max(n, 8) or b - n < 512  # at most 2x (powers of two), then +512


def truncated_probs(logits, temperature, top_k, top_p):
    """The exact sampling distribution, written independently of the sampler (numpy, float64)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.shape, bool)
    kept = order[:top_k] if top_k > 0 else order
    p = np.exp(z[kept] - z[kept].max())
    p /= p.sum()
    mass_before = np.cumsum(p) - p
    keep[kept[mass_before < top_p]] = True
    q = np.where(keep, np.exp(z - z.max()), 0.0)
    return q / q.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (1.0, -1, 1.0),
        (0.5, -1, 1.0),
        pytest.param(1.0, 5, 1.0, marks=pytest.mark.slow),
        pytest.param(0.6, -1, 0.4, marks=pytest.mark.slow),
        pytest.param(0.8, 12, 0.5, marks=pytest.mark.slow),
    ],
)
def test_sampling_distribution_matches_exact(model, temperature, top_k, top_p):
    """One decode step, 16384 samples of one prompt: a chi-square test against the exact
    distribution (fixed seed, so deterministic) and no sample outside the truncated support."""
    ids, mask = left_padded_batch(2, b=2, t=8)
    ids, mask = ids[1:], mask[1:]  # one prompt, one column of left padding
    logits = np.asarray(model(ids, mask))[0, -1]
    p = truncated_probs(logits, temperature, top_k, top_p)
    n = 16384
    r = generate(model, ids, mask, max_new_tokens=1, n=n, rng=jax.random.key(11),
                 temperature=temperature, top_k=top_k, top_p=top_p)  # fmt: skip
    counts = np.bincount(np.asarray(r.tokens[:, 0]), minlength=p.size)
    assert counts[p == 0].sum() == 0
    support = p > 0
    if top_k > 0:
        assert support.sum() <= top_k
    expected = n * p[support]
    observed = counts[support]
    small = expected < 5  # merge sparse cells so the chi-square approximation holds
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    expected *= observed.sum() / expected.sum()  # exact totals for scipy's check
    pvalue = stats.chisquare(observed, expected).pvalue
    assert pvalue > 1e-3, (pvalue, support.sum())
    # And the reported log-probs are of the untruncated tempered distribution.
    full = truncated_probs(logits, temperature, -1, 1.0)
    tok = np.asarray(r.tokens[:64, 0])
    np.testing.assert_allclose(np.asarray(r.log_probs[:64, 0]), np.log(full[tok]), atol=1e-4)


@pytest.mark.parametrize("v", [1, 7, 4096])
def test_gumbel_rows_equal_jax_random_gumbel(v):
    """The fast path (jax's unrolled threefry) gives jax.random.gumbel's bits, row by row."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(5), jnp.arange(9))
    keys = jax.vmap(jax.random.fold_in)(keys, jnp.arange(9) * 7)
    assert sampling._threefry is not None  # else the fast path silently fell back
    ours = jax.jit(sampling.gumbel_rows, static_argnums=1)(keys, v)
    ref = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    other = jax.random.key(0, impl="rbg")  # another key implementation: jax's own path
    np.testing.assert_array_equal(
        sampling.gumbel_rows(other[None], v), jax.random.gumbel(other, (v,))[None]
    )


def test_sample_logits_top_p_boundary():
    """p = [.5, .3, .15, .05]: top_p 0.8 keeps two tokens (0.5 + 0.3 reaches it), 0.81 three."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(4000))
    tile = jnp.tile(logits, (4000, 1))
    for top_p, support in [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.3, {0})]:
        tok, lp = sample_logits(tile, keys, 1.0, top_p, top_k=-1, use_top_p=True)
        assert set(np.unique(np.asarray(tok)).tolist()) == support
        np.testing.assert_allclose(lp, jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))[tok], atol=1e-6)
    tok, _ = sample_logits(tile, keys, 1.0, 1.0, top_k=1, use_top_p=False)
    assert (np.asarray(tok) == 0).all()


@pytest.mark.slow
def test_greedy_is_temperature_zero_and_bf16_runs(prompts):
    ids, mask = prompts
    model = random_decoder("llama", True)
    a = generate(model, ids, mask, max_new_tokens=5, greedy=True)
    b = generate(model, ids, mask, max_new_tokens=5, temperature=0.0, rng=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    bf16 = random_decoder("qwen2", False, dtype=jnp.bfloat16)
    r = generate(bf16, ids, mask, max_new_tokens=5, rng=jax.random.key(0), top_p=0.9)
    assert r.log_probs.dtype == jnp.float32 and np.isfinite(np.asarray(r.log_probs)).all()
    assert (np.asarray(r.log_probs) <= 0).all()


def test_argument_errors(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, ids, np.zeros_like(mask), max_new_tokens=2, greedy=True)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, mask, max_new_tokens=2, greedy=True, top_p=0.0)


@pytest.mark.parity
@pytest.mark.parametrize(
    "family,tied",
    [
        pytest.param("qwen3", False, marks=pytest.mark.slow),
        ("qwen2", True),
        pytest.param("llama", False, marks=pytest.mark.slow),
    ],
)
def test_greedy_matches_transformers(tmp_path, family, tied):
    """Token for token on left-padded prompts, with and without EOS, against `do_sample=False`."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from htpo_jax.models.hf_io import save_pretrained

    model = random_decoder(family, tied, seed=1)
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = left_padded_batch(4, b=3, t=10)
    n = 12

    def hf_greedy(eos):
        with torch.inference_mode():
            out = hf.generate(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0,
                top_k=None, top_p=None, temperature=None,
            )  # fmt: skip
        new = out[:, ids.shape[1] :].numpy()
        return np.pad(new, ((0, 0), (0, n - new.shape[1])))  # HF stops when all rows are done

    ours = generate(model, ids, mask, max_new_tokens=n, greedy=True)
    ref = hf_greedy(None)
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    eos = [int(ref[0, 4]), int(ref[2, 7])]  # ends rows early, on tokens greedy really emits
    ours = generate(model, ids, mask, max_new_tokens=n, greedy=True, eos_token_id=eos)
    np.testing.assert_array_equal(np.asarray(ours.tokens), hf_greedy(eos))
    assert int(ours.lengths[0]) <= 5 and bool(ours.finished[0])
