"""Our losses and advantages against google/tunix's own (an independent implementation), and the
`htpo` tunix policy loss wired through tunix's registry. Needs the tunix extra; docs/LOSS.md
("tunix") names every difference. `python tests/test_tunix_crosscheck.py` prints the largest
differences."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "tunix",
    reason="needs tunix: pip install -e '.[tunix]' && pip install --no-deps google-tunix==0.1.7",
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.qwen3 import model as qwen3_model  # noqa: E402
from tunix.rl import algo_core, common, function_registry  # noqa: E402
from tunix.rl.grpo import dapo_learner, grpo_learner  # noqa: E402

from htpo_jax.integrations import tunix as htpo_tunix  # noqa: E402
from htpo_jax.rl.advantages import grpo_advantages, hard_prompts  # noqa: E402
from htpo_jax.rl.loss import aggregate, dapo_loss, htpo_loss  # noqa: E402

PAD, EOS, VOCAB, G, P, PROMPT, T = 0, 2, 48, 4, 2, 6, 12


def tiny_model(seed: int = 0):
    """A random 2-layer tunix Qwen3 (float32)."""
    cfg = qwen3_model.ModelConfig(
        num_layers=2,
        vocab_size=VOCAB,
        embed_dim=32,
        hidden_dim=64,
        num_heads=2,
        head_dim=16,
        num_kv_heads=2,
        rope_theta=1_000_000,
        norm_eps=1e-6,
        use_tied_embedding=True,
    )
    return qwen3_model.Qwen3(cfg, rngs=nnx.Rngs(seed))


def random_batch(model, seed: int, log_ratio_scale: float = 1.0):
    """A tunix TrainExample of P prompts x G responses: left-padded prompts, completions of
    random lengths padded with PAD, random advantages per response, old log-probs = current
    ones + noise (so the clip and the dual clip both bite)."""
    rng = np.random.default_rng(seed)
    b = P * G
    prompt = rng.integers(3, VOCAB, (b, PROMPT))
    prompt[:, : rng.integers(0, 3)] = PAD
    completion = rng.integers(3, VOCAB, (b, T))
    lengths = rng.integers(2, T + 1, b)
    completion_mask = np.arange(T)[None] < lengths[:, None]
    completion = np.where(completion_mask, completion, PAD)
    example = common.TrainExample(
        prompt_ids=jnp.asarray(prompt),
        prompt_mask=jnp.asarray(prompt != PAD),
        completion_ids=jnp.asarray(completion),
        completion_mask=jnp.asarray(completion_mask),
        advantages=jnp.asarray(rng.normal(size=b), jnp.float32),
        ref_per_token_logps=None,
        old_per_token_logps=None,
    )
    cfg = dapo_learner.DAPOConfig(num_generations=G, overlong_buffer=None)
    cfg.temperature = 1.0  # the learner sets it from the rollout config
    lp = htpo_tunix.policy_terms(model, example, cfg, PAD, EOS)[0]
    noise = rng.normal(scale=log_ratio_scale, size=lp.shape).astype(np.float32)
    return dataclasses.replace(example, old_per_token_logps=lp + noise), rng


def tunix_config(kind: str, agg: str, epsilon_c=None):
    """tunix's DAPO (token-mean, clip-higher) or GRPO config with `agg` and an optional dual
    clip constant (tunix reads `epsilon_c` with getattr; its configs do not declare it)."""
    if kind == "dapo":
        cfg = dapo_learner.DAPOConfig(num_generations=G, overlong_buffer=None, loss_agg_mode=agg)
    else:
        cfg = grpo_learner.GRPOConfig(num_generations=G, beta=0.0, loss_agg_mode=agg)
    cfg.temperature = 1.0
    if epsilon_c is not None:
        cfg.epsilon_c = epsilon_c
    return cfg


CASES = [  # (tunix learner config, tunix aggregation, dual clip c)
    ("dapo", "token-mean", None),
    ("dapo", "token-mean", 10.0),
    ("grpo", "sequence-mean-token-mean", None),
    ("grpo", "sequence-mean-token-scale", 3.0),
    ("grpo", "seq-mean-token-sum", None),
]


def compare(kind: str, agg: str, epsilon_c, seed: int, grads: bool = False) -> dict[str, float]:
    """Largest |ours - tunix's| of the loss, its metrics and (`grads`) every gradient entry, on
    one random batch; also the scales they are compared at. Eager: a jit per side and case
    compiles far longer than the few ops it saves."""
    model = tiny_model(seed)
    example, _ = random_batch(model, seed)
    cfg = tunix_config(kind, agg, epsilon_c)

    def theirs(m):
        return algo_core.grpo_loss_fn(m, example, cfg, PAD, EOS)

    def ours(m):
        lp, old, _, adv, mask = htpo_tunix.policy_terms(m, example, cfg, PAD, EOS)
        return dapo_loss(lp, old, adv, mask, config=htpo_tunix.loss_config_from_tunix(cfg))

    if grads:
        (l_t, aux_t), g_t = nnx.value_and_grad(theirs, has_aux=True)(model)
        (l_o, aux_o), g_o = nnx.value_and_grad(ours, has_aux=True)(model)
    else:
        (l_t, aux_t), (l_o, aux_o) = theirs(model), ours(model)
    out = {"loss": abs(float(l_o) - float(l_t)), "loss_scale": abs(float(l_t))}
    if grads:
        pairs = list(zip(jax.tree.leaves(g_o), jax.tree.leaves(g_t), strict=True))
        out["grad"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
        out["grad_scale"] = max(float(jnp.max(jnp.abs(b))) for _, b in pairs)
    for k in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        out[k] = abs(float(aux_o[k]) - float(aux_t[k]))
    out["pg_clipfrac_value"] = float(aux_t["pg_clipfrac"])
    out["pg_clipfrac_lower_value"] = float(aux_t["pg_clipfrac_lower"])
    # tunix aggregates pg_clipfrac_lower with the loss's mode (algo_core.py:456), ours is always
    # a token mean: the share of dual-clipped tokens, aggregated tunix's way, must match it
    lp, old, _, adv, mask = htpo_tunix.policy_terms(model, example, cfg, PAD, EOS)
    lc = htpo_tunix.loss_config_from_tunix(cfg)
    ratio = jnp.exp(jnp.clip(lp - old, -20.0, 20.0))
    bounded = jnp.clip(ratio, 1 - lc.clip_ratio_low, 1 + lc.clip_ratio_high)
    lower_bt = (adv < 0) & (jnp.maximum(-adv * ratio, -adv * bounded) > -adv * lc.clip_ratio_c)
    their_way = aggregate(lower_bt.astype(jnp.float32), mask, lc.loss_agg_mode)
    out["pg_clipfrac_lower_their_way"] = abs(float(their_way) - float(aux_t["pg_clipfrac_lower"]))
    return out


def check(d: dict, agg: str, epsilon_c) -> None:
    """The agreement a case must show (float32 rounding), and that clip and dual clip bit."""
    assert d["loss"] <= 1e-6 * max(d["loss_scale"], 1.0), d
    if "grad" in d:
        assert d["grad"] <= 1e-5 * d["grad_scale"], d
    assert d["pg_clipfrac"] <= 1e-6 and d["pg_clipfrac_lower_their_way"] <= 1e-6, d
    if agg == "token-mean":
        assert d["pg_clipfrac_lower"] <= 1e-6, d
    assert d["ppo_kl"] <= 1e-5, d
    assert d["pg_clipfrac_value"] > 0  # the clip bit: the comparison covers it
    if epsilon_c is not None:
        assert d["pg_clipfrac_lower_value"] > 0, d  # and the dual clip


@pytest.mark.parametrize("kind, agg, epsilon_c", CASES)
def test_clipped_loss_equals_tunix(kind, agg, epsilon_c):
    """dapo_loss (tunix's clip settings mapped by loss_config_from_tunix) and tunix's
    grpo_loss_fn agree in value and metrics, to float32 rounding, on two random batches."""
    for seed in (0, 1):
        check(compare(kind, agg, epsilon_c, seed), agg, epsilon_c)


@pytest.mark.slow
def test_clipped_loss_gradients_equal_tunix():
    """The same, with every parameter gradient of the tiny model (eager backward passes of
    both losses: over 20 s on a 2-core machine)."""
    for kind, agg, epsilon_c in CASES:
        check(compare(kind, agg, epsilon_c, 0, grads=True), agg, epsilon_c)


def test_group_advantages_equal_tunix():
    """grpo_advantages == tunix's `grpo` estimator (Bessel std + 1e-6), and with
    norm_by_std=False tunix's `drgrpo`; constant groups (std 0) give 0 in both."""
    rng = np.random.default_rng(0)
    for g in (2, 5, 16):
        correct = rng.random((64, g)) < rng.random((64, 1))  # some all-right / all-wrong groups
        overlong = np.where(rng.random((64, g)) < 0.2, -rng.random((64, g)), 0.0)
        scores = np.where(correct, 1.0, -1.0) + overlong
        scores[:4] = 1.0  # constant groups
        flat = scores.reshape(-1)
        grpo = function_registry.get_advantage_estimator("grpo")(rewards=flat, num_generations=g)
        drgrpo = function_registry.get_advantage_estimator("drgrpo")(
            rewards=flat, num_generations=g
        )
        ours = np.asarray(grpo_advantages(jnp.asarray(scores, jnp.float32))).reshape(-1)
        ours_dr = np.asarray(grpo_advantages(jnp.asarray(scores, jnp.float32), norm_by_std=False))
        np.testing.assert_allclose(ours, grpo, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours_dr.reshape(-1), drgrpo, rtol=1e-6, atol=1e-6)
        assert np.all(ours[: 4 * g] == 0) and np.all(np.asarray(grpo)[: 4 * g] == 0)


def test_htpo_is_a_tunix_policy_loss_with_flags_from_the_learner():
    """`htpo` comes out of tunix's registry; on an HTPOTrainExample (flags as HTPOLearner makes
    them) it is htpo_loss of the batch's log-probs, entropy and flags, with gradients; a plain
    TrainExample is refused with a message naming HTPOLearner."""
    assert function_registry.get_policy_loss_fn("htpo") is htpo_tunix.htpo_policy_loss
    model = tiny_model(3)
    example, rng = random_batch(model, 3)
    correct = rng.random(P * G) < 0.5
    correct[:G] = [True, True, True, False]  # group 0: accuracy 0.75, easy
    correct[G : 2 * G] = [True, False, False, False]  # group 1: accuracy 0.25, hard
    ex = htpo_tunix.with_flags(example, correct, G, 0.6)
    assert isinstance(ex, htpo_tunix.HTPOTrainExample)
    want_hard = np.repeat(np.asarray(hard_prompts(correct.reshape(P, G), 0.6)), G)
    np.testing.assert_array_equal(np.asarray(ex.hard), want_hard)
    assert not ex.hard[0] and ex.hard[G]
    np.testing.assert_array_equal(np.asarray(ex.correct), correct)
    cfg = htpo_tunix.HTPOConfig(num_generations=G, overlong_buffer=None)
    cfg.temperature = 1.0
    loss_fn = function_registry.get_policy_loss_fn("htpo")
    (loss, aux), grads = nnx.value_and_grad(lambda m: loss_fn(m, ex, cfg, PAD, EOS), has_aux=True)(
        model
    )
    lp, old, ent, adv, mask = htpo_tunix.policy_terms(model, ex, cfg, PAD, EOS)
    want, metrics = htpo_loss(
        lp, old, ent, adv, mask, ex.hard, ex.correct, config=cfg.to_loss_config()
    )
    assert float(loss) == pytest.approx(float(want), rel=1e-5)  # float32, two programs
    assert sum(float(aux[f"group_frac/{g}"]) for g in htpo_tunix.GROUP_NAMES) == pytest.approx(1.0)
    # the entropy is the same forward pass's: tunix's own entropy of the logits
    assert float(aux["entropy"]) == pytest.approx(
        float(jnp.sum(ent * mask) / jnp.sum(mask)), rel=1e-6
    )
    assert float(jnp.max(jnp.abs(jax.tree.leaves(grads)[0]))) > 0
    with pytest.raises(ValueError, match="HTPOLearner"):
        loss_fn(model, example, cfg, PAD, EOS)


def test_htpo_config_maps_tunix_names_and_refuses_unknown_aggregation():
    cfg = htpo_tunix.HTPOConfig(num_generations=G, epsilon=0.1, epsilon_high=0.3, epsilon_c=5.0)
    lc = cfg.to_loss_config()
    assert (lc.clip_ratio_low, lc.clip_ratio_high, lc.clip_ratio_c) == (0.1, 0.3, 5.0)
    assert lc.loss_agg_mode == "token-mean"
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        htpo_tunix.HTPOConfig(num_generations=G, loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        htpo_tunix.HTPOConfig(num_generations=G, epsilon_c=0.5)


if __name__ == "__main__":
    for case in CASES:
        worst = {}
        for seed in (0, 1):
            for k, v in compare(*case, seed, grads=True).items():
                worst[k] = max(worst.get(k, 0.0), v)
        print(
            f"{case[0]:4s} {case[1]:26s} c={case[2]}: |dloss| {worst['loss']:.2e} "
            f"(loss ~{worst['loss_scale']:.3f}), max|dgrad| {worst['grad']:.2e} "
            f"(max|grad| {worst['grad_scale']:.3f}), |dppo_kl| {worst['ppo_kl']:.2e}, "
            f"|dclipfrac| {worst['pg_clipfrac']:.1e}, |dclipfrac_lower| "
            f"{worst['pg_clipfrac_lower']:.1e} (aggregated tunix's way: "
            f"{worst['pg_clipfrac_lower_their_way']:.1e})"
        )


@pytest.mark.slow
def test_example_trains_to_the_end_offline(monkeypatch):
    """examples/tunix_htpo.py, shortened: tunix's learner with the htpo loss runs its steps on
    CPU without network and logs a finite loss and reward for each."""
    import importlib.util

    monkeypatch.setattr(qwen3_model, "apply_rope", qwen3_model.apply_rope)  # the example patches it
    path = Path(__file__).resolve().parent.parent / "examples" / "tunix_htpo.py"
    spec = importlib.util.spec_from_file_location("tunix_htpo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--steps", "2", "--batch", "4", "--n", "4", "--val-prompts", "8", "--val-samples", "1"]
    rewards, losses, (before, after) = example.main(argv)
    assert len(rewards) == 2 and len(losses) == 2
    assert all(np.isfinite(rewards)) and all(np.isfinite(losses))
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
