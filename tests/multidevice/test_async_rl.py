"""Asynchronous RL on 8 fake CPU devices: `one_step` with `separate` placement (4 devices decode,
4 train) runs the default task end to end, and the rollout each step trains on was sampled with
exactly the weights of the step before: its recorded log-probs equal the scoring of the same
tokens under the parameters step k-1 started from, and not under any other step's."""

import jax
import numpy as np

from htpo_jax.rl.train_step import score_responses
from htpo_jax.run import stages
from htpo_jax.run import train as train_mod
from htpo_jax.run.config import cli_config


def test_one_step_separate_samples_with_the_previous_steps_weights(tmp_path, monkeypatch):
    assert jax.device_count() == 8
    batches, before, programs = [], [], {}
    real_weights, real_dispatch = stages.off_policy_weights, stages.dispatch_updates

    def weights(batch, version, algorithm):  # stage 6b sees the behaviour log-probs
        batches.append(jax.tree.map(np.array, batch))
        return real_weights(batch, version, algorithm)

    def dispatch(p, state, *a):  # the weights a step starts from (version step - 1)
        programs["p"] = p
        before.append(jax.device_get(state.params))
        return real_dispatch(p, state, *a)

    monkeypatch.setattr(stages, "off_policy_weights", weights)
    monkeypatch.setattr(stages, "dispatch_updates", dispatch)
    cfg = cli_config([
        "--config", str(train_mod.DEFAULT_CONFIG), "--set",
        f"trainer.output_dir={tmp_path}", "trainer.total_steps=3", "trainer.val_every=0",
        "trainer.val_before_train=false", "trainer.progress_bar=false",
        "trainer.async_mode=one_step", "rollout.placement=separate", "rollout.devices_per_host=4",
        "algorithm.rollout_is=tis", "checkpoint.save_every=0", "optim.warmup_steps=0",
    ])  # fmt: skip
    summary = train_mod.train(cfg)
    assert summary["steps"] == 3 and len(batches) == 3 and len(before) == 3
    p = programs["p"]
    assert p.mesh.devices.size == 4  # the trainer's mesh: the other 4 devices decode

    def score(b, params):
        lp, _ = score_responses(p.graphdef, params, b.input_ids, b.attention_mask,
                                b.prompt_len, p.step_cfg.temperature)  # fmt: skip
        return np.asarray(lp) * b.response_mask

    for k in (2, 3):  # steps that train on a rollout made during the previous step's update
        b = batches[k - 1]
        m = b.response_mask > 0
        assert (b.version[m] == k - 2).all()  # sampled by version k-2: the weights of step k-1
        errs = [np.abs(score(b, before[v]) - b.behaviour_log_prob)[m].max() for v in range(3)]
        assert errs[k - 2] < 1e-4, errs  # the weights step k-1 started from
        others = [e for v, e in enumerate(errs) if v != k - 2]
        assert min(others) > 100 * errs[k - 2], errs  # and no other step's
    # step 1 samples on-policy (nothing was pending): version 0, its own weights
    assert (batches[0].version[batches[0].response_mask > 0] == 0).all()
