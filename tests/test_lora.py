"""LoRA adapters (models/lora.py): exactness of the adapted model, the update touching only the
adapters, checkpoints that hold only the adapters, resume, and the PEFT round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import left_padded_batch, logits, random_decoder, randomize_adapters, state_logits

from htpo_jax.models import lora
from htpo_jax.rl.loss import LossConfig
from htpo_jax.rl.train_step import StepConfig, TrainState, UpdateBatch, jit_update, make_optimizer
from htpo_jax.run import adapters
from htpo_jax.run.config import ConfigError, load_config


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_fresh_adapters_are_the_base_and_merge_matches(scan):
    model = random_decoder(scan_layers=scan)
    ids, mask = left_padded_batch()
    base_logits = logits(model, ids, mask)
    n = lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=8.0, base_dtype="float32"))
    assert n == 14 if not scan else n == 7  # 7 projections a layer, 2 layers (stacked: 7)
    np.testing.assert_array_equal(logits(model, ids, mask), base_logits)  # B = 0: the base
    randomize_adapters(model)
    adapted = logits(model, ids, mask)
    assert float(jnp.abs(adapted - base_logits).max()) > 1e-2  # the adapters do something
    merged = lora.merge_adapters(model)
    assert not lora.has_adapters(merged)
    np.testing.assert_allclose(logits(merged, ids, mask), adapted, atol=1e-4, rtol=1e-4)
    graphdef, params = nnx.split(model)
    off = state_logits(graphdef, lora.adapters_off(params), ids, mask)
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
        ("model.lora.base_dtype=int4", "allowed: bfloat16, float32, int8, nf4"),
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


def _lora_state(cfg, tx):
    model = random_decoder()
    lora.add_adapters(model, adapters.lora_spec(cfg))
    graphdef, params = nnx.split(model)
    return graphdef, TrainState.create(params, tx, sc=StepConfig.from_config(cfg))


@pytest.mark.parametrize(
    "base_dtype",  # nf4 (a superset: the adapters, the quantized kernels, the rest bf16) quick
    [pytest.param("bfloat16", marks=pytest.mark.slow), "nf4"],
)
def test_two_lora_updates_change_only_the_adapters_and_resume_exactly(tmp_path, base_dtype):
    """2 updates: every adapter moves, every base weight stays bit-equal (nf4: the stored codes
    and scales), AdamW moments exist for the adapters only; a checkpoint after update 1 holds
    only the adapters, and update 2 from it restored onto a fresh base (nf4: quantized again from
    the same weights) equals update 2 straight."""
    from htpo_jax.run.checkpoint import Checkpointer

    cfg = load_config(overrides=["model.lora.rank=4", "model.lora.alpha=8",
                                 f"model.lora.base_dtype={base_dtype}",
                                 "model.lora.block_size=32",  # divides the tiny model's 96
                                 "optim.warmup_steps=0", "optim.learning_rate=1e-2"])  # fmt: skip
    tx = make_optimizer(cfg.optim, 10)
    sc = StepConfig(loss="htpo", loss_config=LossConfig(), temperature=1.0, lora=True)
    graphdef, state = _lora_state(cfg, tx)
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)}
    adapter_state, _ = lora.split_adapters(state.params)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapter_state))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) < 3 * n_adapter + 16
    step = jit_update(graphdef, tx, sc)
    batch = _update_batch(graphdef_vocab(state))
    state, metrics = step(state, batch)
    with Checkpointer(tmp_path / "ckpt", 3) as ckpt:
        ckpt.save(1, adapters.checkpoint_view(state, cfg))
        ckpt.wait()
        shapes = ckpt.restore_extra(1)["param_shapes"]
        assert shapes and all("lora_a" in k or "lora_b" in k for k in shapes), shapes
        _, fresh = _lora_state(cfg, tx)
        restored, _ = ckpt.restore(1, adapters.checkpoint_view(fresh, cfg))
    resumed = adapters.from_checkpoint_view(restored, fresh.params, cfg)
    state, metrics = step(state, batch)
    assert float(metrics["grad_norm"]) > 0 and float(metrics["nonfinite_skipped"]) == 0
    resumed, _ = step(resumed, batch)
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)}
    for p, v in nnx.to_flat_state(resumed.params):
        np.testing.assert_array_equal(np.asarray(v[...]), after[p], err_msg=str(p))
    is_adapter = lambda p: p[-1] in ("lora_a", "lora_b")
    assert all(not np.array_equal(before[p], after[p]) for p in after if is_adapter(p))
    assert all(np.array_equal(before[p], after[p]) for p in after if not is_adapter(p))
    stored = {"kernel_codes": jnp.uint4, "kernel_scale": jnp.float32}  # nf4
    assert all(
        after[p].dtype == stored.get(p[-1], jnp.bfloat16) for p in after if not is_adapter(p)
    )
    assert any(p[-1] == "kernel_codes" for p in after) == (base_dtype == "nf4")


def graphdef_vocab(state) -> int:
    """The vocabulary size of a decoder's parameter state (its embedding's rows)."""
    return state.params["embed_tokens"].shape[0]


# ---------------------------------------------------------------- a LoRA run end to end
@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_run_dir):
    """A tiny LoRA run of 3 steps straight, and the same run stopped after 2 and resumed (float32
    base, KL on: the reference is the base with the adapters off)."""
    from helpers import overrides

    from htpo_jax.run.train import main

    root = tiny_run_dir
    extra = {
        "model.lora.rank": 4,
        "model.lora.alpha": 8,
        "model.lora.base_dtype": "float32",
        "algorithm.use_kl_loss": True,
        "trainer.val_before_train": False,
    }
    out = tmp_path_factory.mktemp("lora")
    main(overrides(root, out / "straight", **{**extra, "trainer.total_steps": 3}))
    main(overrides(root, out / "resumed", **{**extra, "trainer.total_steps": 2}))
    main(overrides(root, out / "resumed", **{**extra, "trainer.total_steps": 3}))
    return root, out


@pytest.mark.slow
def test_lora_run_checkpoints_only_adapters_and_resumes_exactly(lora_runs):
    from htpo_jax.run.checkpoint import Checkpointer
    from htpo_jax.run.metrics import read_metrics

    _, out = lora_runs
    with Checkpointer(out / "straight" / "checkpoints", 5, read_only=True) as ckpt:
        shapes = ckpt.restore_extra(3)["param_shapes"]
    assert shapes and all("lora_a" in k or "lora_b" in k for k in shapes), shapes
    a = {r["step"]: r for r in read_metrics(out / "straight" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(out / "resumed" / "metrics.jsonl")}
    assert abs(a[2]["train/loss"]) > 1e-4 and a[2]["train/grad_norm"] > 0
    assert 0 < a[3]["train/kl_loss"]  # the adapters moved the policy off the base
    for k, v in a[3].items():
        if not k.startswith(("time/", "val/")):
            assert b[3][k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


@pytest.mark.slow
def test_peft_round_trip_and_merged_export_match_ourstate_logits(lora_runs, tmp_path):
    """Adapters exported with --adapter load in peft on the HF base and give our logits (float32,
    1e-4); the merged export loaded by transformers gives them too."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import transformers

    from htpo_jax.run.config import load_config as load
    from htpo_jax.run.policy import restore_run
    from htpo_jax.tools.export import export

    root, out = lora_runs
    run = out / "straight"
    export(run, tmp_path / "adapter", adapter=True)
    export(run, tmp_path / "merged")
    cfg = load(run / "config.yaml")
    ours, _, _ = restore_run(run, 3, cfg=cfg, dtype="float32")
    params = nnx.state(ours)
    assert float(jnp.abs(lora.split_adapters(params)[0]["layers"]["self_attn"]["q_proj"][
        "lora_b"][...]).max()) > 0  # fmt: skip
    ids, mask = left_padded_batch(b=2, t=12, vocab=ours.cfg.vocab_size)
    want = np.asarray(ours(ids, mask))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    ids_t = torch.tensor(ids, dtype=torch.long)
    mask_t = torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(
            cfg.model.path, dtype=torch.float32
        )
        peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        got = peft_model(input_ids=ids_t, attention_mask=mask_t).logits.numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "merged"), dtype=torch.float32
        )
        got_merged = merged(input_ids=ids_t, attention_mask=mask_t).logits.numpy()
    real = mask.astype(bool)  # padding rows are meaningless in both
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_merged[real], want[real], atol=1e-4, rtol=1e-4)
