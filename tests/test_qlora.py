"""QLoRA bases (models/quant.py, `model.lora.base_dtype: int8 | nf4`): the quantization's error
bounds and hand-computed codes, the quantized model against the same model on the dequantized
base (training forward and the rollout engine), merged export, and config errors. The update /
checkpoint / resume on an nf4 base is test_lora's `test_two_lora_updates_...[nf4]`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import left_padded_batch, logits, random_decoder, randomize_adapters, state_logits

from htpo_jax.models import lora, quant
from htpo_jax.models.decoder import DenseGeneral
from htpo_jax.run.config import ConfigError, load_config

CB = quant.NF4_CODEBOOK


def test_nf4_codebook_is_qlora_s_and_qwix_s():
    numerics = pytest.importorskip("qwix._src.core.numerics")
    np.testing.assert_array_equal(CB, np.asarray(numerics.get_nf4_buckets(), np.float32))
    assert CB[0] == -1 and CB[7] == 0 and CB[15] == 1 and np.all(np.diff(CB) > 0)


def test_hand_computed_blocks():
    # nf4, blocks of 4 along the input (axis 0), one output column: absmax 1, then absmax 2.
    w = np.array([0.5, -1.0, 0.3, 0.0, 2.0, 1.0, -0.2, 0.16], np.float32)[:, None]
    codes, scale = quant.quantize(w, "nf4", lead=0, in_ndim=1, block_size=4)
    assert codes.dtype == jnp.uint4 and scale.shape == (2, 1)
    np.testing.assert_array_equal(np.asarray(scale)[:, 0], [1.0, 2.0])
    # nearest codebook values: 0.5 -> 0.4407 (the midpoint to 0.5626 is 0.5017), 0.3 -> 0.3379,
    # -0.2 / 2 = -0.1 -> -0.0911, 0.16 / 2 = 0.08 -> 0.0796
    want = [12, 0, 11, 7, 15, 12, 6, 8]
    np.testing.assert_array_equal(np.asarray(codes)[:, 0].astype(int), want)
    back = quant.dequantize(codes, scale, "nf4", 0, 1)
    np.testing.assert_allclose(np.asarray(back)[:, 0], CB[want] * np.repeat([1.0, 2.0], 4))
    # int8, per output channel over the whole input: absmax 1.27 -> scale 0.01
    w8 = np.array([[1.27, 0.0], [-0.5, 0.2], [0.0, -0.05]], np.float32)
    codes, scale = quant.quantize(w8, "int8", lead=0, in_ndim=1)
    assert codes.dtype == jnp.int8 and scale.shape == (1, 2)
    np.testing.assert_allclose(np.asarray(scale)[0], [0.01, 0.2 / 127], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(codes)[:, 0], [127, -50, 0])
    np.testing.assert_array_equal(np.asarray(codes)[:, 1], [0, 127, -32])  # -31.75


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_round_trip_error_bounds(qtype):
    """Stacked multi-axis kernels [L, *in, *out]: every weight within half the widest gap of its
    block's grid, the codebook values themselves exact, and a small relative error overall."""
    w = jax.random.normal(jax.random.key(0), (2, 4, 16, 64))  # [L, N, H, D]: o_proj's layout
    codes, scale = quant.quantize(w, qtype, lead=1, in_ndim=2, block_size=32)
    assert codes.shape == w.shape
    assert scale.shape == ((2, 1, 64) if qtype == "int8" else (2, 2, 64))
    back = quant.dequantize(codes, scale, qtype, 1, 2)
    err = np.abs(np.asarray(back - w))
    s = np.asarray(scale)[:, :, None, :]  # [L, blocks, 1, D] against [L, blocks, 32, D]
    half_gap = 0.5 if qtype == "int8" else np.diff(CB).max() / 2
    assert np.all(err.reshape(2, -1, 32 if qtype == "nf4" else 64, 64) <= half_gap * s + 1e-6)
    rel = float(jnp.linalg.norm(back - w) / jnp.linalg.norm(w))
    assert rel < (0.01 if qtype == "int8" else 0.12), rel
    # values on the grid come back exactly
    grid = back
    again = quant.dequantize(*quant.quantize(grid, qtype, 1, 2, 32), qtype, 1, 2)
    np.testing.assert_allclose(np.asarray(again), np.asarray(grid), rtol=1e-6, atol=1e-7)
    # bf16 compute: the same whether the scales are cast before (the rollout engine) or inside
    a = quant.dequantize(codes, scale, qtype, 1, 2, jnp.bfloat16)
    b = quant.dequantize(codes, scale.astype(jnp.bfloat16), qtype, 1, 2, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_nf4_codes_equal_qwix():
    qwix = pytest.importorskip("qwix")
    w = jax.random.normal(jax.random.key(1), (128, 48))
    codes, scale = quant.quantize(w, "nf4", lead=0, in_ndim=1, block_size=64)
    ref = qwix.quantize(w, "nf4", channelwise_axes=(1,), tiled_axes={0: 64})
    np.testing.assert_array_equal(np.asarray(codes).astype(int), np.asarray(ref.qvalue).astype(int))
    np.testing.assert_allclose(np.asarray(scale), np.asarray(ref.scale), rtol=1e-6)


def qlora_model(qtype, scan=True, block_size=32):
    model = random_decoder(scan_layers=scan)
    spec = lora.LoraSpec(rank=4, alpha=8.0, base_dtype=qtype, block_size=block_size)
    assert lora.add_adapters(model, spec) == (7 if scan else 14)
    randomize_adapters(model)
    return model


def dequantized_twin(model):
    """The same adapted model with float32 kernels = the QLoRA base dequantized."""
    twin = nnx.clone(model)
    for _, m in nnx.iter_modules(twin):
        if isinstance(m, DenseGeneral):
            axes = m.kernel_codes.get_metadata().get("logical_axes")
            m.kernel = nnx.Param(lora.base_kernel(m), logical_axes=axes)
            del m.kernel_codes, m.kernel_scale, m.quant
    return twin


@pytest.mark.parametrize(
    "qtype,scan",
    [("nf4", True), ("int8", True), pytest.param("nf4", False, marks=pytest.mark.slow)],
)
def test_qlora_logits_equal_the_dequantized_base(qtype, scan):
    """Stored quantized, every projection (adapted or not), the rest bfloat16; the logits and
    the KL reference (adapters off) are those of the same model on the dequantized base."""
    model = qlora_model(qtype, scan)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
    assert not [k for k in flat if k.endswith(".kernel")]
    want = jnp.int8 if qtype == "int8" else jnp.uint4
    assert all(v.dtype == want for k, v in flat.items() if k.endswith("kernel_codes"))
    assert all(v.dtype == jnp.float32 for k, v in flat.items() if k.endswith("kernel_scale"))
    assert flat["embed_tokens"].dtype == jnp.bfloat16 and model.param_dtype == jnp.bfloat16
    ids, mask = left_padded_batch()
    twin = dequantized_twin(model)
    np.testing.assert_allclose(logits(model, ids, mask), logits(twin, ids, mask), atol=1e-5)
    off_q = state_logits(nnx.graphdef(model), lora.adapters_off(nnx.state(model)), ids, mask)
    off_t = state_logits(nnx.graphdef(twin), lora.adapters_off(nnx.state(twin)), ids, mask)
    np.testing.assert_allclose(off_q, off_t, atol=1e-5)


def test_rollout_engine_samples_the_qlora_model():
    """The paged engine (forward_kv / forward_cached) on an nf4 model: the log-probs it records
    are the training forward's (on the same dequantized base) for the tokens it drew."""
    from htpo_jax.rollout import EngineConfig, generate

    model = qlora_model("nf4")
    ids, mask = left_padded_batch(3, b=2, t=11)
    out = generate(model, ids, mask, engine=EngineConfig(page_size=4), max_new_tokens=6, n=1,
                   rng=jax.random.key(2), temperature=1.0)  # fmt: skip
    full = jnp.concatenate([jnp.asarray(ids), jnp.asarray(out.tokens)], 1)
    full_mask = jnp.concatenate([jnp.asarray(mask), jnp.asarray(out.response_mask, bool)], 1)
    logp = jax.nn.log_softmax(logits(model, full, full_mask)[:, ids.shape[1] - 1 : -1], -1)
    want = jnp.take_along_axis(logp, jnp.asarray(out.tokens)[..., None], -1)[..., 0]
    real = np.asarray(out.response_mask, bool)
    assert real.sum() > 4
    np.testing.assert_allclose(np.asarray(out.log_probs)[real], np.asarray(want)[real], atol=1e-4)


def test_merged_export_of_a_qlora_model_matches_itsstate_logits(tmp_path):
    """merge_adapters writes W_dequantized + (alpha / r) A B: the HF checkpoint it saves loads
    back (plain float32 kernels, no adapters) with the QLoRA model's logits."""
    from htpo_jax.models.hf_io import from_pretrained, save_pretrained

    model = qlora_model("nf4")
    merged = lora.merge_adapters(model, dtype="float32")
    assert not lora.has_adapters(merged)
    assert not any(lora.is_quantized(m) for _, m in nnx.iter_modules(merged)
                   if isinstance(m, DenseGeneral))  # fmt: skip
    save_pretrained(merged, tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf", dtype=jnp.float32, param_dtype=jnp.float32)
    ids, mask = left_padded_batch()
    np.testing.assert_allclose(logits(back, ids, mask), logits(model, ids, mask), atol=1e-4)


def test_block_size_must_divide_every_projection_input():
    model = random_decoder()  # down_proj's input is 96
    with pytest.raises(ValueError, match=r"model.lora.block_size 64 .* 96 of layers.mlp.down_proj"):
        lora.add_adapters(model, lora.LoraSpec(rank=2, base_dtype="nf4", block_size=64))


def test_qlora_config_errors_name_the_key():
    cfg = load_config(overrides=["model.lora.rank=8", "model.lora.base_dtype=nf4"])
    assert (cfg.model.lora.base_dtype, cfg.model.lora.block_size) == ("nf4", 64)
    for bad, needle in [
        (["model.lora.base_dtype=nf4"], "model.lora.base_dtype: nf4 .* needs model.lora.rank > 0"),
        (["model.lora.rank=8", "model.lora.base_dtype=int4"], "model.lora.base_dtype: 'int4'"),
        (["model.lora.rank=8", "model.lora.block_size=0"], "model.lora.block_size"),
    ]:
        with pytest.raises(ConfigError, match=needle) as e:
            load_config(overrides=bad)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_qlora_run_resumes_exactly_and_its_merged_export_matches(tiny_run_dir, tmp_path):
    """A tiny nf4 run (KL on: the reference is the quantized base, adapters off) of 3 steps
    straight equals 2 + resume + 1; its checkpoints hold only the adapters (the base is quantized
    again from model.path); the merged export (dequantized base + delta) loads with its logits."""
    from helpers import overrides

    from htpo_jax.models.hf_io import from_pretrained
    from htpo_jax.run.checkpoint import Checkpointer
    from htpo_jax.run.metrics import read_metrics
    from htpo_jax.run.policy import restore_run
    from htpo_jax.run.train import main
    from htpo_jax.tools.export import export

    extra = {
        "model.lora.rank": 4,
        "model.lora.alpha": 8,
        "model.lora.base_dtype": "nf4",
        "model.lora.block_size": 32,
        "algorithm.use_kl_loss": True,
        "trainer.val_before_train": False,
    }
    root = tiny_run_dir
    main(overrides(root, tmp_path / "straight", **{**extra, "trainer.total_steps": 3}))
    main(overrides(root, tmp_path / "resumed", **{**extra, "trainer.total_steps": 2}))
    main(overrides(root, tmp_path / "resumed", **{**extra, "trainer.total_steps": 3}))
    with Checkpointer(tmp_path / "straight" / "checkpoints", 5, read_only=True) as ckpt:
        shapes = ckpt.restore_extra(3)["param_shapes"]
    assert shapes and all("lora_a" in k or "lora_b" in k for k in shapes), shapes
    a = {r["step"]: r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")}
    assert a[3]["train/kl_loss"] > 0 and a[2]["train/grad_norm"] > 0
    for k, v in a[3].items():
        if not k.startswith(("time/", "val/")):
            assert b[3][k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    run = tmp_path / "straight"
    export(run, tmp_path / "merged")
    ours, _, _ = restore_run(run, 3, dtype="float32")
    assert all(
        lora.is_quantized(m) for _, m in nnx.iter_modules(ours) if isinstance(m, DenseGeneral)
    )
    back = from_pretrained(tmp_path / "merged", dtype=jnp.float32, param_dtype=jnp.float32)
    ids, mask = left_padded_batch(b=2, t=12, vocab=ours.cfg.vocab_size)
    np.testing.assert_allclose(logits(back, ids, mask), logits(ours, ids, mask), atol=1e-4)
