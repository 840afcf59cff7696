"""The sampler's entry checks (issue 20 items 2, 5 and the position cap of item 1): every kind of
PRNG key, one ValueError naming the argument for bad inputs, max_new_tokens within the model's
positions."""

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from htpo_jax.rl import sample as rl_sample
from htpo_jax.rollout import Sampler, generate, sampling
from htpo_jax.run.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINES = [None, "static"]


def assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.log_probs), np.asarray(b.log_probs))


@pytest.mark.parametrize("engine", ENGINES)
def test_legacy_prngkey_equals_its_typed_key(model, prompts, engine):
    raw = jax.random.PRNGKey(0)
    typed = jax.random.wrap_key_data(raw)
    assert (jax.random.key_data(typed) == jax.random.key_data(jax.random.key(0))).all()
    kw = dict(max_new_tokens=5, n=2, top_p=0.9, engine=engine)
    a, b = (generate(model, *prompts, rng=k, **kw) for k in (raw, typed))
    assert_same(a, b)


@pytest.mark.parametrize("engine", ENGINES)
def test_rbg_key_samples_reproducibly(model, prompts, engine):
    kw = dict(max_new_tokens=4, engine=engine)
    a = generate(model, *prompts, rng=jax.random.key(1, impl="rbg"), **kw)
    b = generate(model, *prompts, rng=jax.random.key(1, impl="rbg"), **kw)
    assert_same(a, b)
    assert a.tokens.shape == (3, 4)


@pytest.mark.parametrize(
    "rng",
    [
        np.zeros(2, np.float32),  # float key data
        np.zeros(3, np.uint32),  # no impl has this shape
        np.zeros((1, 2), np.uint32),
        np.zeros(2, np.int64),  # a PRNGKey's data must be uint32
        np.zeros(4, np.uint32),  # raw rbg data while the default impl is threefry: ambiguous
        jax.random.split(jax.random.key(0), 2),  # two keys, not one
        0,  # a seed
    ],
    ids=["float", "uint32[3]", "uint32[1,2]", "int64[2]", "uint32[4]", "keys[2]", "seed"],
)
def test_bad_rng_is_one_value_error(model, prompts, rng):
    with pytest.raises(ValueError, match="rng"):
        generate(model, *prompts, max_new_tokens=2, rng=rng)


def test_rl_sampling_hands_the_sampler_the_same_key_for_prngkey_and_key():
    """`sample_and_score` folds the step's key per call; a PRNGKey and its typed key give the
    sampler the same key."""
    cfg = load_config(None, [])
    batch = dataclasses.make_dataclass("B", ["input_ids", "attention_mask"])(
        np.ones((2, 4), np.int32), np.ones((2, 4), np.int32)
    )
    tok = type("Tok", (), dict(eos_token_id=1, unk_token_id=0, pad_token_id=0))()
    tok.convert_tokens_to_ids = lambda t: 0
    seen = []

    class Stop(Exception):
        pass

    def sampler(params, ids, mask, *, rng, **kw):
        seen.append(jax.random.key_data(sampling.as_key(rng)))
        raise Stop

    for rng in (jax.random.PRNGKey(3), jax.random.key(3)):
        with pytest.raises(Stop):
            rl_sample.sample_and_score(
                sampler, None, tok, batch, cfg, rng=rng, n=2, temperature=1.0, top_p=1.0, top_k=-1
            )
    np.testing.assert_array_equal(seen[0], seen[1])


NAN = float("nan")
BAD = [
    ("temperature", dict(temperature=NAN)),
    ("temperature", dict(temperature=float("inf"))),
    ("temperature", dict(temperature="hot")),
    ("prompt_ids", dict(ids=lambda i, m: np.where(m, 128, 0))),  # = vocab_size
    ("prompt_ids", dict(ids=lambda i, m: np.where(m, -1, 0))),
    ("prompt_ids", dict(ids=lambda i, m: i.astype(np.float32))),
    ("prompt_ids", dict(ids=lambda i, m: i[0], mask=lambda i, m: m[0])),  # 1-D
    ("prompt_mask", dict(mask=lambda i, m: m[0])),
    ("prompt_mask", dict(mask=lambda i, m: m[:, 1:])),  # shapes differ
    ("cache_dtype", dict(cache_dtype=jnp.int8)),
    ("cache_dtype", dict(cache_dtype="no-such-dtype")),
    ("top_k", dict(top_k=1.5)),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=True)),
    ("max_new_tokens", dict(max_new_tokens=2.5)),
    ("n", dict(n=0)),
    ("top_p", dict(top_p=NAN)),
    ("engine", dict(engine="vllm")),
]


@pytest.mark.parametrize("name,bad", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_inputs_are_one_value_error_naming_the_argument(model, prompts, name, bad):
    ids, mask = prompts
    bad = dict(bad)
    ids = bad.pop("ids", lambda i, m: i)(ids, mask)
    mask = bad.pop("mask", lambda i, m: m)(prompts[0], mask)
    kw = {"max_new_tokens": 2, "rng": jax.random.key(0), **bad}
    for engine in ENGINES:
        with pytest.raises(ValueError, match=name):
            generate(model, ids, mask, **{"engine": engine, **kw})


def test_paged_is_the_engine_and_padding_ids_are_not_checked(model, prompts):
    ids, mask = prompts
    ids = np.where(mask, ids, -1)  # only real tokens have to be in the vocabulary
    kw = dict(max_new_tokens=4, rng=jax.random.key(2))
    assert_same(generate(model, ids, mask, engine="paged", **kw), generate(model, ids, mask, **kw))


def sampler_with_positions(model, positions: int) -> Sampler:
    graphdef, _ = nnx.split(model)
    cfg = dataclasses.replace(model.cfg, max_position_embeddings=positions)
    return Sampler(sampling.StaticGraph(graphdef), cfg, model.dtype)


@pytest.mark.parametrize("engine", ENGINES)
def test_max_new_tokens_capped_at_the_positions_with_a_warning(model, prompts, engine):
    sampler, params = sampler_with_positions(model, 16), nnx.state(model)
    kw = dict(rng=jax.random.key(0), engine=engine)
    with pytest.warns(UserWarning, match=r"max_new_tokens=20 capped at 6.*=16.*10 tokens"):
        r = sampler(params, *prompts, max_new_tokens=20, **kw)
    assert r.tokens.shape == (3, 6)
    assert_same(r, sampler(params, *prompts, max_new_tokens=6, **kw))  # the same rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the positions: no warning
        sampler(params, *prompts, max_new_tokens=6, **kw)


@pytest.mark.parametrize("positions", [8, 10])
def test_a_prompt_without_room_for_a_response_is_an_error(model, prompts, positions):
    sampler = sampler_with_positions(model, positions)
    with pytest.raises(ValueError, match=f"10 tokens.*max_position_embeddings={positions}"):
        sampler(nnx.state(model), *prompts, max_new_tokens=1, greedy=True)


def test_the_default_run_fits_the_shipped_model_positions():
    """Prompts are cut to data.max_prompt_length: the default run is never capped."""
    cfg = load_config(os.path.join(HERE, "..", "configs", "default.yaml"))
    with open(os.path.join(cfg.model.path, "config.json")) as f:
        positions = json.load(f)["max_position_embeddings"]
    assert cfg.data.max_prompt_length + cfg.rollout.max_response_length <= positions
