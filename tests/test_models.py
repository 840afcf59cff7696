"""Decoder, ModelConfig and HF interop: parity with transformers' PyTorch models, export round
trips, sharded checkpoints, and the KV-cache path against the full forward."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import (
    FAMILIES,
    hf_config_dict,
    left_padded_batch,
    random_decoder,
    to_4x_style,
)

from htpo_jax.models.decoder import Decoder, positions_from_mask, rope_inv_freq
from htpo_jax.models.hf_io import from_pretrained, save_pretrained
from htpo_jax.models.model_config import ModelConfig, RopeScaling


def hf_model_dir(tmp_path, family, tied, *, shard=False, four_x=False):
    """A random transformers model saved to disk, with every weight perturbed away from init."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    d = hf_config_dict(family, tied)
    config = AutoConfig.for_model(
        **{k: v for k, v in d.items() if k != "model_type"}, model_type=family
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    path = tmp_path / f"{family}_{tied}"
    model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    if four_x:
        (path / "config.json").write_text(json.dumps(to_4x_style(d)))
    return path, model


def hf_logits(model, ids, mask):
    import torch

    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(pos),
        )
    return out.logits.float().numpy()


@pytest.mark.parity
@pytest.mark.parametrize(
    "family,tied,scan_layers", [(f, t, True) for f, t in FAMILIES] + [("qwen3", False, False)]
)
def test_logits_match_transformers(tmp_path, family, tied, scan_layers):
    path, hf = hf_model_dir(tmp_path, family, tied)
    model = from_pretrained(path, dtype=jnp.float32, scan_layers=scan_layers)
    assert model.scan_layers == scan_layers
    cfg = model.cfg
    assert cfg.tie_word_embeddings == tied and (model.lm_head is None) == tied
    assert cfg.qk_norm == (family == "qwen3") and cfg.qkv_bias == (family == "qwen2")
    assert (cfg.rope_scaling is not None) == (family == "llama")
    n_ours = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model)))
    assert n_ours == cfg.num_params() == sum(p.numel() for p in hf.parameters())
    ids, mask = left_padded_batch()
    ours = np.asarray(jax.jit(lambda i, m: model(i, m))(ids, mask))
    ref = hf_logits(hf, ids, mask)
    assert np.abs(ours - ref)[mask].max() < 2e-4


@pytest.mark.parity
def test_llama3_rope_frequencies_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = hf_config_dict("llama", False)
    inv_hf, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**d), torch.device("cpu"))
    ours = rope_inv_freq(ModelConfig.from_hf_dict(d))
    scaled = ours != rope_inv_freq(ModelConfig.from_hf_dict({**d, "rope_parameters": None}))
    assert scaled.any()  # the test config really exercises the scaling
    np.testing.assert_allclose(ours, inv_hf.numpy(), rtol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_config_json_4x_style_loads_the_same(tmp_path, family):
    path, hf = hf_model_dir(tmp_path, family, False, four_x=True)
    cfg_5x = ModelConfig.from_hf_dict(hf_config_dict(family, False))
    model = from_pretrained(path, dtype=jnp.float32)
    assert model.cfg == cfg_5x
    ids, mask = left_padded_batch(1)
    assert np.abs(np.asarray(model(ids, mask)) - hf_logits(hf, ids, mask))[mask].max() < 2e-4


@pytest.mark.parity
def test_sharded_hf_checkpoint_loads(tmp_path):
    path, hf = hf_model_dir(tmp_path, "qwen2", False, shard=True)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    model = from_pretrained(path, dtype=jnp.float32)
    ids, mask = left_padded_batch(2)
    assert np.abs(np.asarray(model(ids, mask)) - hf_logits(hf, ids, mask))[mask].max() < 2e-4


@pytest.mark.parity
@pytest.mark.parametrize(
    "family,tied,scan_layers",
    [("qwen3", False, True), ("qwen2", True, True), ("llama", False, True), ("qwen3", True, False)],
)
def test_save_pretrained_loads_in_transformers(tmp_path, family, tied, scan_layers):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = random_decoder(family, tied, scan_layers=scan_layers)
    save_pretrained(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, mask = left_padded_batch(3)
    ours = np.asarray(model(ids, mask))
    assert np.abs(ours - hf_logits(hf, ids, mask))[mask].max() < 2e-4


@pytest.mark.parametrize("scan_layers", [True, False])
def test_save_load_round_trip_multi_file(tmp_path, scan_layers):
    model = random_decoder("qwen2", False, scan_layers=scan_layers)
    save_pretrained(model, tmp_path, max_shard_bytes=30_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]  # one tensor per layer
    loaded = from_pretrained(tmp_path, dtype=jnp.float32, scan_layers=scan_layers)
    assert loaded.cfg == model.cfg
    for (p1, v1), (p2, v2) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded)), strict=True
    ):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(v1[...]), np.asarray(v2[...]))


def test_bf16_checkpoint_and_dtypes(tmp_path):
    model = random_decoder("llama", True)
    save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    mixed = from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mixed.layers.mlp.up_proj.kernel[...].dtype == jnp.float32
    ids, mask = left_padded_batch(4)
    logits = mixed(ids, mask)
    assert logits.dtype == jnp.float32
    ref = np.asarray(model(ids, mask))
    err = np.abs(np.asarray(logits) - ref)[mask]
    assert err.max() < 0.1 * np.abs(ref).max()


def test_unsupported_model_type_error_lists_supported(tmp_path):
    d = dict(hf_config_dict("qwen3", False), model_type="mistral")
    with pytest.raises(ValueError, match=r"mistral.*\['llama', 'qwen2', 'qwen3'\]"):
        ModelConfig.from_hf_dict(d)
    d = dict(hf_config_dict("qwen3", False), rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn.*default.*llama3"):
        ModelConfig.from_hf_dict(d)


def test_config_styles_agree_and_export_both():
    for family in ("qwen3", "qwen2", "llama"):
        d = hf_config_dict(family, False)
        cfg = ModelConfig.from_hf_dict(d)
        assert ModelConfig.from_hf_dict(to_4x_style(d)) == cfg
        out = cfg.to_hf_dict()
        assert ModelConfig.from_hf_dict(out) == cfg
        assert out["rope_theta"] == cfg.rope_theta and "rope_parameters" in out
    llama = ModelConfig.from_hf_dict(hf_config_dict("llama", False))
    assert llama.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)


@pytest.mark.slow
def test_remat_and_attention_chunks_give_same_values_and_gradients():
    ids, mask = left_padded_batch(5, t=11)

    def loss(m):
        logits = m(ids, mask)
        return (logits * mask[..., None]).sum(), logits

    grad = nnx.jit(nnx.grad(loss, has_aux=True))
    g1, l1 = grad(random_decoder("qwen3", False))
    g2, l2 = grad(random_decoder("qwen3", False, remat=True, attention_chunk_size=4))
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def _by_layer(grads_state, num_layers):
    """{unstacked flat path: array}: a scanned model's [L, ...] leaves split per layer."""
    out = {}
    for path, v in nnx.to_flat_state(grads_state):
        if path[0] == "layers" and not isinstance(path[1], int):
            for i in range(num_layers):
                out[("layers", i) + path[1:]] = np.asarray(v[...][i])
        else:
            out[path] = np.asarray(v[...])
    return out


@pytest.mark.slow
def test_scanned_and_looped_layers_give_same_values_and_gradients(tmp_path):
    ids, mask = left_padded_batch(7, t=11)
    looped = random_decoder("qwen3", False, scan_layers=False)
    save_pretrained(looped, tmp_path)
    scanned = from_pretrained(tmp_path, dtype=jnp.float32, remat=True)
    assert scanned.scan_layers and scanned.layers.self_attn.q_proj.kernel.shape[0] == 2

    def loss(m):
        logits = m(ids, mask)
        return (logits * mask[..., None]).sum(), logits

    grad = nnx.jit(nnx.grad(loss, has_aux=True))
    g_loop, l_loop = grad(looped)
    g_scan, l_scan = grad(scanned)
    np.testing.assert_allclose(l_scan, l_loop, rtol=1e-6, atol=1e-6)
    g_loop, g_scan = _by_layer(g_loop, 2), _by_layer(g_scan, 2)
    assert g_loop.keys() == g_scan.keys()
    for path, a in g_loop.items():
        np.testing.assert_allclose(g_scan[path], a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_program_size_does_not_grow_with_depth_when_scanned(scan_layers):
    """Lowered fwd+bwd of a 2- and an 8-layer model: the scanned program is the same size."""

    def program_chars(num_layers):
        cfg = ModelConfig.from_hf_dict(
            dict(hf_config_dict("qwen3", False), num_hidden_layers=num_layers)
        )
        model = nnx.eval_shape(lambda: Decoder(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        loss = lambda st, i: nnx.merge(graphdef, st)(i).sum()
        return len(jax.jit(jax.grad(loss)).lower(state, ids).as_text())

    two, eight = program_chars(2), program_chars(8)
    if scan_layers:
        assert eight < 1.05 * two, (two, eight)
    else:
        assert eight > 2 * two, (two, eight)


def test_attention_mask_keyword():
    model = random_decoder("qwen3", False)
    ids, mask = left_padded_batch(8, b=2, t=9)
    ref = np.asarray(model(ids, mask))
    np.testing.assert_array_equal(np.asarray(model(ids, attention_mask=mask)), ref)
    np.testing.assert_array_equal(np.asarray(model(ids, attention_mask_bt=mask)), ref)
    assert np.abs(ref - np.asarray(model(ids))).max() > 1e-3  # the mask matters here
    with pytest.raises(TypeError, match="not both"):
        model(ids, attention_mask=mask, attention_mask_bt=mask)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_kv_with_a_per_layer_kv_fn_equals_forward_cached(scan_layers):
    """A kv_fn written against one layer's slice (`per_layer`) gives the dense cache's result."""
    from htpo_jax.models.attention import attend
    from htpo_jax.models.decoder import KVCache, per_layer

    model = random_decoder("qwen3", False, scan_layers=scan_layers)
    b, p, s = 3, 7, 10
    ids, full_mask = left_padded_batch(9, b=b, t=p)
    kv_mask = jnp.zeros((b, s), bool).at[:, :p].set(full_mask)
    positions = positions_from_mask(full_mask)
    mask_bts = (jnp.arange(s)[None, :] <= jnp.arange(p)[:, None])[None] & kv_mask[:, None, :]

    def one_layer(q_btnh, k_btkh, v_btkh, cache_l):
        # [B, S, K, H] <- [B, T, K, H] at slots [0, T)
        k_bskh = jax.lax.dynamic_update_slice(cache_l.k, k_btkh, (0, 0, 0, 0))
        v_bskh = jax.lax.dynamic_update_slice(cache_l.v, v_btkh, (0, 0, 0, 0))
        return attend(q_btnh, k_bskh, v_bskh, mask_bts), KVCache(k=k_bskh, v=v_bskh)

    @nnx.jit
    def both(model, ids):
        cache = model.init_cache(b, s, jnp.float32)
        ref = model.forward_cached(ids, positions, cache, 0, kv_mask)
        ours = model.forward_kv(ids, positions, cache, per_layer(one_layer))
        return ref, ours

    (h_ref, c_ref), (h, c) = both(model, ids)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), atol=1e-6)
    np.testing.assert_allclose(np.asarray(c.k), np.asarray(c_ref.k), atol=1e-6)
    np.testing.assert_allclose(np.asarray(c.v), np.asarray(c_ref.v), atol=1e-6)
    assert np.abs(np.asarray(c.v)[1, :, :p]).min() > 0  # layer 1 was written


@pytest.mark.parametrize(
    "family,scan_layers",
    [
        ("qwen3", True),
        ("qwen2", True),
        ("llama", True),
        pytest.param("qwen3", False, marks=pytest.mark.slow),  # ~14 s loaded: looped layers
    ],
)
def test_prefill_then_decode_matches_full_forward(family, scan_layers):
    """Prefill a left-padded prompt, decode token by token in lax.fori_loop: same logits."""
    model = random_decoder(family, family == "qwen2", scan_layers=scan_layers)
    b, p, n = 3, 7, 6
    s = p + n + 3  # a cache longer than needed: trailing slots stay masked
    ids, full_mask = left_padded_batch(6, b=b, t=p + n)
    prompt_mask = full_mask[:, :p]
    ref = np.asarray(model(ids, full_mask))

    @nnx.jit
    def generate_logits(model, ids):
        cache = model.init_cache(b, s, jnp.float32)
        kv_mask = jnp.zeros((b, s), bool).at[:, :p].set(prompt_mask)
        positions = positions_from_mask(prompt_mask)
        hidden, cache = model.forward_cached(ids[:, :p], positions, cache, 0, kv_mask)
        prefill = model.unembed(hidden)  # [B, P, V]

        def step(i, carry):
            cache, kv_mask, pos_b1, out = carry
            slot = p + i
            kv_mask = kv_mask.at[:, slot].set(True)
            token_b1 = jax.lax.dynamic_slice_in_dim(ids, slot, 1, axis=1)
            hidden, cache = model.forward_cached(token_b1, pos_b1, cache, slot, kv_mask)
            out = jax.lax.dynamic_update_slice_in_dim(out, model.unembed(hidden), i, axis=1)
            return cache, kv_mask, pos_b1 + 1, out

        out = jnp.zeros((b, n, model.cfg.vocab_size), jnp.float32)
        carry = (cache, kv_mask, positions[:, -1:] + 1, out)
        return prefill, jax.lax.fori_loop(0, n, step, carry)[-1]

    prefill, decoded = generate_logits(model, ids)
    np.testing.assert_allclose(np.asarray(prefill)[prompt_mask], ref[:, :p][prompt_mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(decoded), ref[:, p:], atol=1e-5)


def test_init_cache_shapes():
    model = random_decoder("qwen3")
    cache = model.init_cache(2, 10)
    cfg = model.cfg
    assert cache.k.shape == (cfg.num_layers, 2, 10, cfg.num_kv_heads, cfg.head_dim)
    assert cache.v.dtype == model.dtype


def test_tokenizer_loads_offline(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    from htpo_jax.models.hf_io import load_tokenizer

    vocab = {"<pad>": 0, "a": 1, "b": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).pad_token_id == 0


# ---------------------------------------------------------------- issue 20 item 7
@pytest.mark.parametrize(
    "keys",
    [
        # the config: 5.x says default, the 4.x key (which transformers reads first) yarn
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
         "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
        {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic"}},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0},
         "rope_scaling": {"rope_type": "default"}},
    ],
)  # fmt: skip
def test_rope_scaling_the_decoder_lacks_is_refused_whatever_other_keys_say(keys):
    """Before: the first config loaded as plain RoPE (max logit error 2.14 vs transformers)."""
    d = {**hf_config_dict("qwen3", False), **keys}
    with pytest.raises(ValueError, match=r"rope_type=.* is not supported.*\['default', 'llama3'\]"):
        ModelConfig.from_hf_dict(d)
    d = {**hf_config_dict("qwen3", False), "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 is not supported"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parity
def test_rope_scaling_and_rope_parameters_read_as_transformers_reads_them():
    """Both keys present and disagreeing: transformers takes `rope_scaling`; so do we."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = hf_config_dict("llama", False)
    d = {
        **d,
        "rope_scaling": dict(d["rope_parameters"]),
        "rope_parameters": {"rope_type": "default"},
    }
    hf_cfg = LlamaConfig(**d)
    inv_hf, _ = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](
        hf_cfg, torch.device("cpu")
    )
    ours = ModelConfig.from_hf_dict(d)
    assert ours.rope_scaling is not None
    np.testing.assert_allclose(rope_inv_freq(ours), inv_hf.numpy(), rtol=1e-6)
    d["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}  # incomplete: names the key
    with pytest.raises(ValueError, match="low_freq_factor"):
        ModelConfig.from_hf_dict(d)


def test_from_pretrained_accepts_dtype_names(tmp_path):
    """Before: `from_pretrained(dtype="bf16")` raised numpy's TypeError."""
    save_pretrained(random_decoder("qwen3", False), tmp_path)
    names = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32}
    names |= {"float32": jnp.float32, "fp16": jnp.float16, "torch.bfloat16": jnp.bfloat16}
    for name, want in names.items():
        model = from_pretrained(tmp_path, dtype=name)
        assert model.dtype == want and model.embed_tokens[...].dtype == want, name
    mixed = from_pretrained(tmp_path, dtype="bf16", param_dtype="fp32")
    assert mixed.dtype == jnp.bfloat16 and mixed.embed_tokens[...].dtype == jnp.float32
    with pytest.raises(ValueError, match="dtype 'int8'.*bf16"):
        from_pretrained(tmp_path, dtype="int8")


def test_hf_style_keyword_arguments():
    """Before: `model(input_ids=...)` raised TypeError (the parameter was `input_ids_bt`)."""
    model = random_decoder("qwen3", False)
    ids, mask = left_padded_batch(8, b=2, t=9)
    ref = np.asarray(model(ids, mask))
    np.testing.assert_array_equal(np.asarray(model(input_ids=ids, attention_mask=mask)), ref)
    np.testing.assert_array_equal(np.asarray(model(ids, attention_mask=mask)), ref)
    np.testing.assert_array_equal(np.asarray(model(input_ids_bt=ids, attention_mask=mask)), ref)
    with pytest.raises(TypeError, match="input_ids or input_ids_bt, not both"):
        model(ids, input_ids=ids)
    with pytest.raises(TypeError, match="input_ids"):
        model(attention_mask=mask)
