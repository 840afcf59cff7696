"""GRPO advantages, difficulty flags and the dynamic-sampling filter vs hand-computed values."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from htpo_jax.rl.advantages import dynamic_sampling_keep, grpo_advantages, hard_prompts


def test_grpo_advantages_hand_computed():
    s = np.array([[1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    a = np.asarray(grpo_advantages(s))
    std = np.std([1, -1, -1, -1], ddof=1)  # Bessel-corrected, as torch.std
    np.testing.assert_allclose(a[0], (s[0] + 0.5) / (std + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(a[1], 0.0)  # a uniform group has no signal
    np.testing.assert_allclose(grpo_advantages(s, norm_by_std=False)[0], s[0] + 0.5)


@settings(max_examples=30, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(2, 16)),
        elements=st.sampled_from([-1.0, 1.0, 0.5, -0.25]),
    )
)
def test_grpo_matches_torch_reference(scores):
    t = torch.tensor(scores)
    want = (t - t.mean(-1, keepdim=True)) / (t.std(-1, keepdim=True) + 1e-6)
    np.testing.assert_allclose(grpo_advantages(scores), want.numpy(), rtol=1e-5, atol=1e-5)


def test_group_of_one_keeps_its_score():
    np.testing.assert_allclose(
        grpo_advantages(np.array([[1.0], [-1.0]]))[:, 0],
        np.array([1.0, -1.0]) / (1 + 1e-6),
        rtol=1e-7,
    )
    assert np.asarray(dynamic_sampling_keep(np.array([[1.0], [0.0]]))).all()


def test_hard_is_strictly_below_threshold():
    correct = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    # accuracies 0.6, 0.4, 0.0, 1.0: 0.6 is not < 0.6
    np.testing.assert_array_equal(hard_prompts(correct, 0.6), [False, True, True, False])


def test_dynamic_sampling_drops_uniform_groups():
    acc = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]], np.float32)
    np.testing.assert_array_equal(dynamic_sampling_keep(acc), [False, False, True, True])
