"""HTPO inside google/tunix (`pip install -e ".[tunix]"`, see docs/LOSS.md "tunix").

This module owns the glue between tunix's RL learners and `htpo_jax.rl.loss.htpo_loss`:

* `htpo` registered as a tunix policy loss through tunix's own registry
  (`tunix.rl.function_registry.register_policy_loss_fn`), so a tunix config selects it with
  `policy_loss_fn="htpo"`;
* `HTPOConfig`, tunix's `DAPOConfig` plus HTPO's hyper-parameters (`to_loss_config()` maps the
  tunix names onto `LossConfig`);
* `HTPOTrainExample`, tunix's `TrainExample` plus the two per-response flags HTPO needs:
  `hard` (the prompt's group accuracy < `difficulty_threshold`) and `correct` (the verifier's
  verdict);
* `HTPOLearner`, tunix's `DAPOLearner` that fills those flags.

How the loss gets what tunix's learner does not carry: tunix's `TrainExample` holds ids, masks,
advantages and log-probs only. `correct` comes from a verifier the user passes to `HTPOLearner`
(`correct_fn`, same calling convention as a tunix reward function): the learner calls it next to
the reward functions, on the same prompts and completions. `hard` is computed from `correct` over
each group of `num_generations` consecutive responses (tunix's group layout, the one its GRPO
advantage estimator reshapes by) before tunix splits the batch into micro-batches; both are `[B]`
arrays, so tunix's row slicing keeps them aligned with the rows. The token entropy is computed
inside the loss from the policy logits that tunix's `compute_per_token_logps` returns, the same
forward pass that gives the log-probs (HTPO stop-gradients it).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.rl import algo_core, common, function_registry
from tunix.rl.grpo import dapo_learner

from htpo_jax.rl.advantages import hard_prompts
from htpo_jax.rl.loss import GROUP_NAMES, LossConfig, htpo_loss

POLICY_LOSS_NAME = "htpo"

# tunix's aggregation names -> ours, only where the formulas are the same (docs/LOSS.md):
# tunix's "sequence-mean-token-scale" divides each row's sum by T (its default norm), our
# seq-mean-token-sum-norm with max_response_length=None; tunix's "sequence-mean-token-sum-norm"
# divides the total by the number of non-empty rows, which is our seq-mean-token-sum.
AGG_MODE_FROM_TUNIX = {
    "token-mean": "token-mean",
    "sequence-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "sequence-mean-token-scale": "seq-mean-token-sum-norm",
    "sequence-mean-token-sum-norm": "seq-mean-token-sum",
}


@flax.struct.dataclass(frozen=True)
class HTPOTrainExample(common.TrainExample):
    """tunix's `TrainExample` plus HTPO's per-response flags, `[B]` bools."""

    hard: jax.Array | None = None
    correct: jax.Array | None = None


@dataclasses.dataclass(kw_only=True)
class HTPOConfig(dapo_learner.DAPOConfig):
    """tunix's DAPO configuration with `policy_loss_fn="htpo"` and HTPO's knobs.

    `epsilon` / `epsilon_high` / `epsilon_c` are tunix's names of our clip_ratio_low / high / c
    (tunix's DAPOConfig has no `epsilon_c`, so its DAPO has no dual clip; HTPO's default is the
    paper's c = 10). `loss_agg_mode` takes tunix's names (`AGG_MODE_FROM_TUNIX`).
    """

    policy_loss_fn: str = POLICY_LOSS_NAME
    epsilon_c: float = 10.0
    difficulty_threshold: float = 0.6
    high_entropy_ratio: float = 0.2
    drop_low_entropy_ratio: float = 0.006
    drop_high_entropy_ratio: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        if self.loss_agg_mode not in AGG_MODE_FROM_TUNIX:
            raise ValueError(
                f"HTPOConfig.loss_agg_mode must be one of {tuple(AGG_MODE_FROM_TUNIX)}, "
                f"got {self.loss_agg_mode!r}"
            )
        self.to_loss_config()  # the loss's own bounds, checked now rather than inside jit

    def to_loss_config(self) -> LossConfig:
        """The `LossConfig` these tunix settings mean."""
        return loss_config_from_tunix(self)


def loss_config_from_tunix(algo_config: Any) -> LossConfig:
    """`LossConfig` from any tunix GRPO/DAPO config (missing HTPO knobs take the paper's values;
    no `epsilon_c` means no dual clip in tunix, which our loss expresses as c = inf)."""
    defaults = LossConfig()
    eps_c = getattr(algo_config, "epsilon_c", None)
    return LossConfig(
        clip_ratio_low=algo_config.epsilon,
        clip_ratio_high=getattr(algo_config, "epsilon_high", algo_config.epsilon),
        clip_ratio_c=float("inf") if eps_c is None else eps_c,
        high_entropy_ratio=getattr(algo_config, "high_entropy_ratio", defaults.high_entropy_ratio),
        drop_low_entropy_ratio=getattr(
            algo_config, "drop_low_entropy_ratio", defaults.drop_low_entropy_ratio
        ),
        drop_high_entropy_ratio=getattr(
            algo_config, "drop_high_entropy_ratio", defaults.drop_high_entropy_ratio
        ),
        loss_agg_mode=AGG_MODE_FROM_TUNIX[algo_config.loss_agg_mode],
    )


def policy_terms(model, train_example, algo_config, pad_id: int, eos_id: int):
    """(log_prob, old_log_prob, entropy, advantages, mask) of a tunix batch, `[B, T]` float32:
    one forward pass of `model` (tunix's `compute_per_token_logps`, with the rollout temperature
    the learner stored in `algo_config`), entropy from the same logits."""
    graphdef, state = nnx.split(model)
    log_prob, logits = common.compute_per_token_logps(
        graphdef,
        state,
        prompt_tokens=train_example.prompt_ids,
        completion_tokens=train_example.completion_ids,
        pad_id=pad_id,
        eos_id=eos_id,
        stop_gradient=False,
        return_logits=True,
        segment_ids=getattr(train_example, "segment_ids", None),
        segment_positions=getattr(train_example, "segment_positions", None),
        temperature=getattr(algo_config, "temperature", 1.0),
    )
    log_prob = log_prob.astype(jnp.float32)
    entropy = algo_core.compute_entropy_from_logits(logits.astype(jnp.float32))
    old = train_example.old_per_token_logps
    # tunix leaves old log-probs out when each batch is used once (num_iterations=1): the
    # ratio is then exactly 1 in value, as its own GRPO loss assumes.
    old = jax.lax.stop_gradient(log_prob) if old is None else old.astype(jnp.float32)
    adv = jnp.asarray(train_example.advantages, jnp.float32)
    adv = jnp.broadcast_to(adv if adv.ndim == 2 else adv[:, None], log_prob.shape)
    return log_prob, old, entropy, adv, train_example.completion_mask


@function_registry.register_policy_loss_fn(POLICY_LOSS_NAME)
def htpo_policy_loss(model, train_example, algo_config, pad_id, eos_id, **kwargs):
    """tunix policy loss `htpo`: `htpo_loss` on the batch's log-probs, entropy, advantages and
    the `hard` / `correct` flags of an `HTPOTrainExample`. Returns (loss, aux) as tunix's own
    losses do (aux: pg_clipfrac, pg_clipfrac_lower, ppo_kl, entropy, the 8 group fractions)."""
    del kwargs
    hard = getattr(train_example, "hard", None)
    correct = getattr(train_example, "correct", None)
    if hard is None or correct is None:
        raise ValueError(
            "policy_loss_fn='htpo' needs per-response hard/correct flags: train with "
            "htpo_jax.integrations.tunix.HTPOLearner (a plain tunix learner does not carry them)"
        )
    log_prob, old, entropy, adv, mask = policy_terms(
        model, train_example, algo_config, pad_id, eos_id
    )
    loss, metrics = htpo_loss(
        log_prob,
        old,
        entropy,
        adv,
        mask,
        hard,
        correct,
        config=loss_config_from_tunix(algo_config),
    )
    m = mask.astype(jnp.float32)
    aux = dict(metrics)
    aux["entropy"] = jnp.sum(entropy * m) / jnp.maximum(jnp.sum(m), 1.0)
    aux["kl"] = jnp.float32(0.0)  # tunix's learner logs "kl"; HTPO (like DAPO) has no KL term
    return loss, aux


def with_flags(example, correct: np.ndarray, num_generations: int, threshold: float):
    """`example` (any tunix TrainExample) as an `HTPOTrainExample` with `correct` and the
    group-derived `hard` flags; rows are groups of `num_generations` consecutive responses."""
    correct = np.asarray(correct, bool).reshape(-1)
    if correct.size % num_generations:
        raise ValueError(f"{correct.size} responses do not split into groups of {num_generations}")
    hard = np.repeat(
        np.asarray(hard_prompts(correct.reshape(-1, num_generations), threshold)),
        num_generations,
    )
    fields = {f.name: getattr(example, f.name) for f in dataclasses.fields(example)}
    return HTPOTrainExample(**fields, hard=jnp.asarray(hard), correct=jnp.asarray(correct))


class HTPOLearner(dapo_learner.DAPOLearner):
    """tunix's DAPO learner that trains with the `htpo` loss.

    `correct_fn(prompts, completions, **kwargs) -> sequence of bools` is the verifier (called
    like a tunix reward function, with the dataset's extra columns as keyword arguments); its
    verdicts become `correct` and, per group, `hard`. Everything else (rollout, rewards,
    advantages, optimizer, checkpoints, metrics) is tunix's.
    """

    def __init__(
        self,
        rl_cluster,
        algo_config: HTPOConfig,
        reward_fns,
        correct_fn: Callable[..., Sequence[bool]],
        metric_fns=None,
        data_shuffle_seed=None,
    ):
        if algo_config.policy_loss_fn != POLICY_LOSS_NAME:
            raise ValueError(
                f"HTPOLearner needs policy_loss_fn={POLICY_LOSS_NAME!r}, "
                f"got {algo_config.policy_loss_fn!r}"
            )
        self._correct_fn = correct_fn
        self._verdicts = threading.local()  # rollouts may run on a producer thread
        super().__init__(
            rl_cluster=rl_cluster,
            algo_config=algo_config,
            reward_fns=reward_fns,
            metric_fns=metric_fns,
            data_shuffle_seed=data_shuffle_seed,
        )
        logged = {"kl": np.mean, "pg_clipfrac": np.mean, "ppo_kl": np.mean, "entropy": np.mean}
        logged.update({f"group_frac/{g}": np.mean for g in GROUP_NAMES})
        self.rl_cluster.actor_trainer.with_rl_metrics_to_log(logged)

    def _compute_rewards(self, prompts, completions, mode, step=None, **kwargs):
        """tunix's rewards; also records the verifier's verdicts on the same completions."""
        verdicts = self._correct_fn(prompts=prompts, completions=completions, **kwargs)
        if len(verdicts) != len(completions):
            raise ValueError(
                f"correct_fn returned {len(verdicts)} verdicts for {len(completions)} completions"
            )
        self._verdicts.value = np.asarray(verdicts, bool)
        return super()._compute_rewards(prompts, completions, mode, step=step, **kwargs)

    def _generate_and_compute_advantage(self, training_input, mode=None):
        """tunix's rollout + advantages, returned as an `HTPOTrainExample`."""
        args = () if mode is None else (mode,)
        example = super()._generate_and_compute_advantage(training_input, *args)
        correct = self._verdicts.value
        self._verdicts.value = None
        return with_flags(
            example,
            correct,
            self.algo_config.num_generations,
            self.algo_config.difficulty_threshold,
        )
