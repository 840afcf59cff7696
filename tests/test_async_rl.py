"""Asynchronous RL: the off-policy weights (`rl.offpolicy`), the losses' homogeneity in the
advantage that lets the weight ride on it, the resume queue of the data stream, the config and
placement checks, and (slow) a 50-step `stream` run that loses and duplicates no prompt, never
trains a group staler than `trainer.max_staleness`, and weighs every current-version token 1."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from htpo_jax.infra import placement
from htpo_jax.rl import offpolicy
from htpo_jax.rl.loss import LOSSES, LossConfig, LossInputs
from htpo_jax.rollout import Rollout
from htpo_jax.run import async_rl, stages
from htpo_jax.run import train as train_mod
from htpo_jax.run.config import ConfigError, cli_config, load_config
from htpo_jax.run.data import DataState, PromptStream


def _logps(seed, shape=(6, 9)):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2, 1, shape)
    return old, old + rng.normal(0, 0.7, shape), rng.integers(0, 3, shape), rng.random(shape) > 0.2


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), mode=st.sampled_from(["tis", "mis"]), cap=st.floats(1.1, 5))
def test_is_weights_rules(seed, mode, cap):
    old, behaviour, staleness, mask = _logps(seed)
    w, m = offpolicy.is_weights(old, behaviour, staleness, mask, mode, cap)
    rho = np.exp(old - behaviour)
    fresh, stale = mask & (staleness == 0), mask & (staleness > 0)
    assert (w[fresh] == 1.0).all() and (w[~mask] == 1.0).all()  # current version: exactly 1
    if mode == "tis":
        np.testing.assert_allclose(w[stale], np.minimum(rho[stale], cap), rtol=1e-6)
    else:
        inside = (rho >= 1 / cap) & (rho <= cap)
        np.testing.assert_allclose(w[stale & inside], rho[stale & inside], rtol=1e-6)
        assert (w[stale & ~inside] == 0).all()
    assert w[mask].max() <= cap * (1 + 1e-6)
    assert 0 <= m["offpolicy/is_clipped_frac"] <= m["offpolicy/stale_token_frac"] <= 1


def test_is_weights_off_and_bad_mode():
    old, behaviour, staleness, mask = _logps(0)
    w, _ = offpolicy.is_weights(old, behaviour, staleness, mask, "off", 2.0)
    assert (w == 1).all()
    with pytest.raises(ValueError, match="mode must be"):
        offpolicy.is_weights(old, behaviour, staleness, mask, "seq", 2.0)


@pytest.mark.parametrize("name", ["htpo", "dapo", "grpo", "dr_grpo", "high_entropy_only"])
def test_losses_scale_with_a_positive_advantage_weight(name):
    """w * A (w > 0, per row) multiplies each row's token losses by w: with one row scaled, the
    loss moves by exactly that row's share, and no clip / group metric changes."""
    rng = np.random.default_rng(1)
    b, t = 8, 12
    f32 = lambda x: np.asarray(x, np.float32)
    lp, old = f32(rng.normal(-1, 0.3, (b, t))), f32(rng.normal(-1, 0.3, (b, t)))
    adv = f32(np.repeat(rng.normal(0, 1, (b, 1)), t, 1))
    mask = (rng.random((b, t)) > 0.1).astype(np.float32)
    ent = f32(rng.random((b, t)) * 2)
    hard, correct = rng.random(b) > 0.5, rng.random(b) > 0.5
    cfg = LossConfig(max_response_length=t)

    def run(a):
        inputs = LossInputs(lp, old, a, mask, ent, hard, correct)
        return LOSSES[name](inputs, config=cfg, num_tokens=float(mask.sum()), num_sequences=b)

    base, m0 = run(adv)
    scaled, m1 = run(adv * 2.5)
    np.testing.assert_allclose(scaled, 2.5 * base, rtol=1e-5)
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-7, err_msg=k)
    w = np.ones((b, 1), np.float32)
    w[3] = 0.25  # one row weighed: the loss is linear in that row's contribution
    only3 = np.zeros((b, 1), np.float32)
    only3[3] = 1
    if name == "htpo":  # its entropy split is per response: row 3 alone is row 3's loss
        row3 = run(adv * only3)[0]
        np.testing.assert_allclose(run(adv * w)[0], base - 0.75 * row3, rtol=1e-5, atol=1e-7)


def test_off_policy_weights_stage_scales_advantages_and_drops_behaviour():
    old, behaviour, version, mask = _logps(3)
    mask = mask.astype(np.float32)
    batch = stages.UpdateBatch(
        input_ids=np.zeros((6, 11), np.int32), attention_mask=np.ones((6, 11), np.int32),
        response_mask=mask, old_log_prob=old * mask, ref_log_prob=np.zeros_like(mask),
        advantages=np.ones_like(mask) * mask, hard=np.zeros(6, bool), correct=np.ones(6, bool),
        prompt_len=2, behaviour_log_prob=behaviour * mask, version=version,
    )  # fmt: skip
    algo = load_config(None, ["algorithm.rollout_is=tis"]).algorithm
    out, metrics = stages.off_policy_weights(batch, 2, algo)
    assert out.behaviour_log_prob is None and out.version is None  # never sent to the device
    w, _ = offpolicy.is_weights(old * mask, behaviour * mask, 2 - version, mask, "tis", 2.0)
    np.testing.assert_allclose(out.advantages, mask * w)
    assert (out.advantages[(version == 2) & (mask > 0)] == 1).all()
    rows = (mask > 0).any(-1)
    want = np.where(mask > 0, 2 - version, 0).max(-1)[rows].mean()
    assert metrics["staleness/mean"] == pytest.approx(want)
    same, none = stages.off_policy_weights(batch.replace(behaviour_log_prob=None), 2, algo)
    assert none == {} and same.advantages is batch.advantages  # synchronous: untouched


def test_data_state_requeue_is_served_first_and_round_trips(tiny_run_dir):
    from htpo_jax.models.hf_io import load_tokenizer
    from htpo_jax.run.data import PromptDataset

    tok = load_tokenizer(str(tiny_run_dir / "model"))
    ds = PromptDataset([str(tiny_run_dir / "data" / "train.jsonl")], tok, max_prompt_length=32)
    plain = PromptStream(ds, seed=3).next_indices(5)
    st = DataState(0, 0, requeue=(7, 2))
    assert DataState.from_json(st.to_json()) == st
    assert "requeue" not in DataState(1, 4).to_json()  # synchronous checkpoints: as before
    s = PromptStream(ds, seed=3, state=st)
    assert s.next_indices(1) == [7]
    assert s.next_indices(5) == [2, *plain[:4]]
    assert s.state == DataState(0, 4)


def test_async_config_checks():
    with pytest.raises(ConfigError, match="rollout.placement: separate needs trainer.async_mode"):
        load_config(None, ["rollout.placement=separate"])
    with pytest.raises(ConfigError, match="rollout.segment_tokens"):
        load_config(None, ["trainer.async_mode=stream", "rollout.segment_tokens=99999"])
    with pytest.raises(ConfigError, match="trainer.async_mode: needs rollout.engine=paged"):
        load_config(None, ["trainer.async_mode=one_step", "rollout.engine=static"])
    with pytest.raises(ConfigError, match="algorithm.rollout_is_cap: must be > 1"):
        load_config(None, ["algorithm.rollout_is_cap=1"])
    assert load_config(None, []).trainer.async_mode == "off"  # the paper's recipe by default
    # a bare `off` is a bool to YAML 1.1: the choice named off is meant
    c = load_config(None, ["trainer.async_mode=off", "algorithm.rollout_is=off"])
    assert (c.trainer.async_mode, c.algorithm.rollout_is) == ("off", "off")


def test_separate_placement_needs_two_devices_per_host():
    assert jax.local_device_count() == 1
    with pytest.raises(placement.PlacementError, match="rollout.devices_per_host: each host has 1"):
        placement.split_devices(0)


def _stream_cfg(out, steps):
    return cli_config([
        "--config", str(train_mod.DEFAULT_CONFIG), "--set", f"trainer.output_dir={out}",
        f"trainer.total_steps={steps}", "trainer.val_every=0", "trainer.val_before_train=false",
        "trainer.progress_bar=false", "trainer.async_mode=stream", "trainer.max_staleness=1",
        "algorithm.rollout_is=tis", "data.train_batch_size=4", "data.gen_batch_size=8",
        "rollout.n=4", "rollout.max_response_length=48", "rollout.segment_tokens=12",
        "optim.mini_batch_size=4", "optim.micro_batch_size=16", "checkpoint.save_every=0",
    ])  # fmt: skip


@pytest.mark.slow  # ~3 min on 2 cores
def test_stream_50_steps_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    drawn, trained, dropped, batches = [], [], [], []
    cls = async_rl.Stream
    real_refill, real_pop, real_drop = cls._refill, cls.pop, cls.drop_stale
    real_weights = stages.off_policy_weights

    def refill(self):
        n0 = len(self.groups)
        real_refill(self)
        drawn.extend(g.draw for g in self.groups[n0:])

    def pop(self, need):
        taken = real_pop(self, need)
        trained.append([(g.draw, oldest) for g, _, oldest in taken])
        return taken

    def drop(self, version):
        out = real_drop(self, version)
        dropped.extend(g.draw for g in out)
        return out

    def weights(batch, version, algorithm):
        batches.append((version, jax.tree.map(np.array, batch)))
        return real_weights(batch, version, algorithm)

    monkeypatch.setattr(cls, "_refill", refill)
    monkeypatch.setattr(cls, "pop", pop)
    monkeypatch.setattr(cls, "drop_stale", drop)
    monkeypatch.setattr(stages, "off_policy_weights", weights)
    captured = {}
    real_take = cls.take

    def take(self, params, rng, step):
        captured["ro"] = self
        return real_take(self, params, rng, step)

    monkeypatch.setattr(cls, "take", take)
    summary = train_mod.train(_stream_cfg(tmp_path, 50))
    assert summary["steps"] == 50 and len(trained) == 50
    ro = captured["ro"]
    flat = [d for step in trained for d, _ in step]
    assert len(flat) == len(set(flat)) == 50 * 4  # nothing trained twice
    filtered = set(drawn) - set(flat) - set(dropped)
    left = {g.draw for g in ro.groups} | {g.draw for g, _, _ in ro.buffer}
    assert len(drawn) == len(set(drawn)) == ro.draws  # every draw once, numbered in order
    assert set(flat) | set(dropped) | left | filtered == set(drawn)
    assert not (set(flat) & set(dropped)) and not (left & (set(flat) | set(dropped)))
    assert len(filtered - left) == ro.counts["filtered"]
    for step, groups in enumerate(trained, start=1):  # staleness bound at training time
        assert all((step - 1) - oldest <= 1 for _, oldest in groups)
    for version, b in batches:
        m = b.response_mask > 0
        stale = version - b.version
        assert (stale[m] >= 0).all() and (stale[m] <= 1).all()
    # every IS weight is 1 on tokens sampled by the current version: the advantages are untouched
    for version, b in batches[:5]:
        w, _ = offpolicy.is_weights(b.old_log_prob, b.behaviour_log_prob, version - b.version,
                                    b.response_mask, "tis", 2.0)  # fmt: skip
        assert (w[(b.response_mask > 0) & (b.version == version)] == 1).all()


class _FakeSampler:
    """Emits token `MARK` per step and EOS once a row holds `LENGTH` response tokens (it counts
    the MARKs already in its prompt: what `Stream` feeds back); every log-prob is -params, so a
    token's log-prob names the weights that sampled it."""

    MARK, LENGTH = 5, 20

    def __init__(self, eos):
        self.eos, self.sync, self.dtype, self.calls = eos, None, np.float32, []

    def __call__(self, params, ids, mask, *, max_new_tokens, eos_token_id, **kw):
        self.calls.append((np.array(ids), np.array(mask)))
        rows = ids.shape[0]
        tok = np.zeros((rows, max_new_tokens), np.int32)
        lp = np.zeros((rows, max_new_tokens), np.float32)
        lengths, finished = np.zeros(rows, np.int32), np.zeros(rows, bool)
        for i in range(rows):
            have = int(((ids[i] == self.MARK) & (mask[i] > 0)).sum())
            left = self.LENGTH - have  # tokens to go, the last one EOS
            k = min(left, max_new_tokens)
            tok[i, :k] = self.MARK
            if k == left:
                tok[i, k - 1], finished[i] = self.eos, True
            lp[i, :k], lengths[i] = -float(params), k
        rmask = (np.arange(max_new_tokens)[None] < lengths[:, None]).astype(np.int32)
        return Rollout(tok, rmask, lp, lengths, finished)


def _stream(partial: str):
    from htpo_jax.infra.distributed import HostSync
    from htpo_jax.models.hf_io import load_tokenizer
    from htpo_jax.rl.sample import stop_tokens
    from htpo_jax.run.data import train_stream

    cfg = load_config(str(train_mod.DEFAULT_CONFIG), [
        "trainer.async_mode=stream", f"rollout.partial={partial}", "rollout.segment_tokens=8",
        "rollout.n=2", "data.train_batch_size=2", "data.gen_batch_size=3",
        "algorithm.dynamic_sampling=false", "optim.mini_batch_size=2", "optim.micro_batch_size=4",
    ])  # fmt: skip
    tok = load_tokenizer(cfg.model.path)
    sampler = _FakeSampler(stop_tokens(tok)[0])
    p = type("P", (), dict(tokenizer=tok, sampler=sampler))
    s = type("S", (), dict(stream=train_stream(cfg, tok), pools=None, sync=HostSync("t")))
    return async_rl.Stream(p, s, cfg), sampler


def test_stream_rounds_carry_responses_with_each_tokens_version():
    ro, sampler = _stream("continue")
    ro.round(0.0, None, version=0)  # 8 tokens each, with the weights of version 0
    ro.round(1.0, None, version=1)  # 8 more under version 1
    assert not ro.buffer and len(ro.groups) == 2  # train_batch_size groups in flight (no filter)
    ids, mask = sampler.calls[1]
    g = ro.groups[0]
    fed = ids[0][mask[0] > 0]  # the second round's prompt: the prompt, then the 8 tokens so far
    np.testing.assert_array_equal(fed, np.concatenate([g.prompt, g.tokens[0, :8]]))
    ro.round(2.0, None, version=2)  # the last 4 tokens (EOS last): both groups finish
    assert not ro.groups and len(ro.buffer) == 2
    g, kept, oldest = ro.buffer[0]
    assert oldest == 0 and (g.length == 20).all() and g.eos.all()
    np.testing.assert_array_equal(kept.version[0, :20], [0] * 8 + [1] * 8 + [2] * 4)
    np.testing.assert_array_equal(kept.behaviour_log_prob[0, :20], -kept.version[0, :20])
    assert kept.response_mask[0].sum() == 20 and (kept.behaviour_log_prob[0, 20:] == 0).all()
    assert ro.drop_stale(version=1) == [] and len(ro.drop_stale(version=2)) == 2  # bound 1
    assert ro.counts["dropped_stale"] == 2 and not ro.buffer
    requeued = ro.data_state().requeue
    assert requeued == ()  # nothing buffered or in flight: nothing to draw again


def test_stream_restart_drops_tokens_of_older_weights_and_requeues_in_draw_order():
    ro, _ = _stream("restart")
    ro.round(0.0, None, version=0)
    ro.round(1.0, None, version=1)  # version moved: both rows of both groups start over
    assert ro.counts["restarted"] == 4
    g = ro.groups[0]
    assert (g.length == 8).all() and (g.version[:, :8] == 1).all()
    assert ro.data_state().requeue == tuple(g.row_id for g in ro.groups)
