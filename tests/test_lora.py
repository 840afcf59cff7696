"""LoRA adapters (models/lora.py): exactness of the adapted model, the update touching only the
adapters, checkpoints that hold only the adapters, resume, and the PEFT round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import left_padded_batch, random_decoder

from htpo_jax.models import lora
from htpo_jax.rl.loss import LossConfig
from htpo_jax.rl.train_step import StepConfig, TrainState, UpdateBatch, jit_update, make_optimizer
from htpo_jax.run.config import ConfigError, load_config


def _randomize_adapters(model, seed=1, std=0.1):
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        key = jax.random.fold_in(jax.random.key(seed), i)
        var.set_value(std * jax.random.normal(key, var.shape, var.dtype))


@jax.jit
def _logits(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def logits(model, ids, mask):
    """The model's logits through one jitted call (eager op-by-op runs are slow on CPU)."""
    return _logits(*nnx.split(model), ids, mask)


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_fresh_adapters_are_the_base_and_merge_matches(scan):
    model = random_decoder(scan_layers=scan)
    ids, mask = left_padded_batch()
    base_logits = logits(model, ids, mask)
    n = lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=8.0, base_dtype="float32"))
    assert n == 14 if not scan else n == 7  # 7 projections a layer, 2 layers (stacked: 7)
    np.testing.assert_array_equal(logits(model, ids, mask), base_logits)  # B = 0: the base
    _randomize_adapters(model)
    adapted = logits(model, ids, mask)
    assert float(jnp.abs(adapted - base_logits).max()) > 1e-2  # the adapters do something
    merged = lora.merge_adapters(model)
    assert not lora.has_adapters(merged)
    np.testing.assert_allclose(logits(merged, ids, mask), adapted, atol=1e-4, rtol=1e-4)
    graphdef, params = nnx.split(model)
    off = _logits(graphdef, lora.adapters_off(params), ids, mask)
    np.testing.assert_array_equal(off, base_logits)  # the KL reference: the base, exactly


def test_target_selects_projections_and_bad_target_is_refused():
    model = random_decoder()
    assert lora.add_adapters(model, lora.LoraSpec(rank=2, target=r"self_attn\.q_proj$")) == 1
    paths = {p[:-1] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert paths == {("layers", "self_attn", "q_proj")}
    with pytest.raises(ValueError, match="matches no projection"):
        lora.add_adapters(random_decoder(), lora.LoraSpec(rank=2, target="no_such_proj"))


def test_config_keys_validate_with_one_line():
    assert load_config().model.lora.rank == 0  # off by default
    cfg = load_config(overrides=["model.lora.rank=8", "model.lora.alpha=32"])
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (8, 32.0)
    for bad, needle in [
        ("model.lora.rank=-1", "model.lora.rank"),
        ("model.lora.base_dtype=nf4", "allowed: bfloat16, float32"),
        ("model.lora.target=(", "model.lora.target"),
        ("model.lora.rnak=2", "did you mean 'model.lora.rank'"),
    ]:
        with pytest.raises(ConfigError, match=needle) as e:
            load_config(overrides=[bad])
        assert "\n" not in str(e.value)


def _update_batch(vocab, n=4, p=6, r=8, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (n, p + r)).astype(np.int32)
    rmask = np.ones((n, r), np.float32)
    rmask[1, 5:] = 0
    adv = np.where(np.arange(n) % 2, 1.0, -1.0)[:, None] * rmask
    batch = UpdateBatch(
        input_ids=ids,
        attention_mask=np.concatenate([np.ones((n, p)), rmask], 1).astype(np.int32),
        response_mask=rmask,
        old_log_prob=np.full((n, r), -4.0, np.float32) * rmask,
        ref_log_prob=np.zeros((n, r), np.float32),
        advantages=adv.astype(np.float32),
        hard=np.arange(n) < 2,
        correct=np.arange(n) % 2 == 1,
        prompt_len=p,
    )
    return jax.tree.map(lambda x: x[None], batch)  # one micro-batch: [1, n, ...]


def test_two_lora_updates_change_only_the_adapters():
    model = random_decoder()
    lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=8.0))
    graphdef, params = nnx.split(model)
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}
    optim = load_config(overrides=["optim.warmup_steps=0", "optim.learning_rate=1e-2"]).optim
    tx = make_optimizer(optim, 10)
    sc = StepConfig(loss="htpo", loss_config=LossConfig(), temperature=1.0, lora=True)
    adapters, _ = lora.split_adapters(params)
    state = TrainState(params, tx.init(adapters), jnp.zeros((), jnp.int32), jax.random.key(0))
    # AdamW moments exist for the adapters only
    moments = jax.tree.leaves(state.opt_state)
    assert sum(x.size for x in moments) < 3 * sum(x.size for x in jax.tree.leaves(adapters)) + 16
    step = jit_update(graphdef, tx, sc)
    batch = _update_batch(model.cfg.vocab_size)
    for _ in range(2):
        state, metrics = step(state, batch)
        assert float(metrics["grad_norm"]) > 0 and float(metrics["nonfinite_skipped"]) == 0
    changed = {
        p: not np.array_equal(before[p], np.asarray(v[...]))
        for p, v in nnx.to_flat_state(state.params)
    }
    adapter_paths = {p for p in changed if p[-1] in ("lora_a", "lora_b")}
    assert adapter_paths and all(changed[p] for p in adapter_paths)
    assert not any(changed[p] for p in changed if p not in adapter_paths)  # the base: bit-equal
    assert all(v.dtype == jnp.bfloat16 for p, v in before.items() if p not in adapter_paths)
