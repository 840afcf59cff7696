"""The jitted pieces of one RL step: old/reference log-probs (stage 6) and the PPO update (stage 7).

The update takes one PPO mini-batch laid out as `[n_micro, micro, ...]` and scans over the
micro-batches, accumulating gradients; every micro-batch loss is divided by the token count of the
whole mini-batch (`num_tokens`), so accumulation gives exactly the one-big-batch gradient
(token-mean). Then one optax step (AdamW with warmup counted in RL steps, global-norm clipping),
skipped when the loss or gradient norm is not finite (as verl does).

The model is split once into a static `graphdef` and the parameter `nnx.State`; only the state
and the optimizer state travel through jit. `update` donates the `TrainState` (argument 0): the
old parameters and moments are dead after the step, so XLA reuses their buffers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from htpo_jax.models import lora
from htpo_jax.models.logprobs import logprobs_and_entropy
from htpo_jax.rl.loss import LOSSES, LossConfig, LossInputs, aggregate


@struct.dataclass
class TrainState:
    """What an RL step changes: the policy, its optimizer state, the update count, the run key.
    The only live copy of the parameters (the sampler and the scorer are called with them)."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: optimizer updates done (non-finite skips included)
    rng: jax.Array  # typed PRNG key of the run (split per RL step)

    @classmethod
    def create(cls, params, tx, seed: int = 0, step: int = 0,
               sc: StepConfig | None = None) -> TrainState:  # fmt: skip
        """The state before update `step`: `params`, `tx`'s fresh optimizer state over the
        trainable ones (`split_trainable`: with `sc.lora` the adapters), the run key of `seed`."""
        opt_state = tx.init(split_trainable(params, sc)[0])
        return cls(params, opt_state, jnp.asarray(step, jnp.int32), jax.random.key(seed))


@struct.dataclass
class UpdateBatch:
    """Responses of one mini-batch (or a whole step), `[..., N, L]` with L = P + R.

    `prompt_len` is static (`pytree_node=False`): it fixes the slice that lines log-probs up with
    response tokens, and changing it must (and does) give a new compiled shape anyway.
    """

    input_ids: jax.Array  # [..., N, P+R] int32, left-padded prompt + response
    attention_mask: jax.Array  # [..., N, P+R] int32
    response_mask: jax.Array  # [..., N, R] float32, 1 on response tokens that count
    old_log_prob: jax.Array  # [..., N, R] float32, rollout-policy log-probs (stage 6)
    ref_log_prob: jax.Array  # [..., N, R] float32, reference policy (zeros when KL is off)
    advantages: jax.Array  # [..., N, R] float32, GRPO advantage broadcast over tokens
    hard: jax.Array  # [..., N] bool, the prompt's accuracy < difficulty_threshold
    correct: jax.Array  # [..., N] bool, the verifier's verdict
    prompt_len: int = struct.field(pytree_node=False, default=0)
    # Host-side only, between stages 5 and 6 of an asynchronous step (`offpolicy`): the
    # sampler's log-probs and each token's policy version; None before the update (never on device).
    behaviour_log_prob: jax.Array | None = None  # [..., N, R] float32
    version: jax.Array | None = None  # [..., N, R] int32


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the jitted update needs from the run config (hashable: a static argument)."""

    loss: str
    loss_config: LossConfig
    temperature: float
    use_kl_loss: bool = False
    kl_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    chunk_size: int = 1024
    lora: bool = False  # model.lora.rank > 0: only the adapters are differentiated and updated

    @classmethod
    def from_config(cls, cfg) -> StepConfig:
        """The update's settings from a run `Config` (`algorithm`, `rollout.temperature`, and
        `rollout.max_response_length`: the constant divisor of seq-mean-token-sum-norm)."""
        a = cfg.algorithm
        # LossConfig's own fields, read by name from `algorithm` (the config declares them all),
        # but the Dr. GRPO divisor: the rollout's length cap, the same for every (micro-)batch
        # whatever its padded width.
        rollout_fields = {"max_response_length": cfg.rollout.max_response_length}
        loss_fields = {
            f.name: getattr(a, f.name)
            for f in dataclasses.fields(LossConfig)
            if f.name not in rollout_fields
        }
        return cls(
            loss=a.loss,
            loss_config=LossConfig(**loss_fields, **rollout_fields),
            temperature=cfg.rollout.temperature,
            use_kl_loss=a.use_kl_loss,
            kl_coef=a.kl_coef,
            kl_loss_type=a.kl_loss_type,
            lora=cfg.model.lora.rank > 0,
        )


def split_trainable(params: nnx.State, sc: StepConfig | None) -> tuple[nnx.State, object]:
    """(what the optimizer updates, the frozen rest or None): with LoRA (`sc.lora`) the
    adapters and the base; else all of `params` and None. Gradients, AdamW moments and the
    non-finite skip see only the first part; `join_trainable` puts them back together."""
    return lora.split_adapters(params) if sc is not None and sc.lora else (params, None)


def join_trainable(trainable: nnx.State, frozen: nnx.State | None) -> nnx.State:
    """The full parameter state from `split_trainable`'s two parts."""
    return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def rl_step_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """lr as a function of the 0-based RL step index s (step s+1 of the run): linear warmup from
    0 over `warmup_steps` RL steps, then constant or cosine down to `min_lr_ratio` at
    `total_steps`. verl's scheduler has the same values (it steps once per RL step)."""
    o = optim_cfg
    if o.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            o.learning_rate,
            max(o.warmup_steps, 1),
            max(total_steps, o.warmup_steps + 1),
            end_value=o.learning_rate * o.min_lr_ratio,
        )
    if not o.warmup_steps:
        return optax.constant_schedule(o.learning_rate)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
            optax.constant_schedule(o.learning_rate),
        ],
        [o.warmup_steps],
    )


def _clipped_adamw(learning_rate, *, o) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip else adamw


def make_optimizer(
    optim_cfg, total_steps: int, updates_per_step: int = 1
) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, lr from `rl_step_schedule` counted in RL steps.

    The schedule is counted in RL steps, as verl's (train.sh's `lr_warmup_steps=10` is 10 RL
    steps of 4 updates each): update u belongs to RL step u // updates_per_step, so every update
    of one step uses that step's lr. `inject_hyperparams` keeps the lr of the latest update in
    `opt_state.hyperparams["learning_rate"]` and counts updates outside the AdamW state, which is
    what lets a skipped (non-finite) update keep the AdamW state and still advance the schedule.
    """
    per_step = max(int(updates_per_step), 1)
    by_step = rl_step_schedule(optim_cfg, total_steps)
    return optax.inject_hyperparams(functools.partial(_clipped_adamw, o=optim_cfg))(
        learning_rate=lambda update: by_step(update // per_step)
    )


def response_logprobs(graphdef, params, ids, mask, prompt_len: int, temperature, chunk_size):
    """(log_prob, entropy) [N, R] of the response tokens: position P-1+j predicts token P+j."""
    model = nnx.merge(graphdef, params)
    lp, ent = logprobs_and_entropy(model, ids, mask, temperature=temperature, chunk_size=chunk_size)
    return lp[:, prompt_len - 1 :], ent[:, prompt_len - 1 :]  # [N, P+R-1] -> [N, R]


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def score_responses(graphdef, params, ids, mask, prompt_len, temperature, chunk_size=1024):
    """Stage 6: log-probs and entropies of a batch under `params` (no gradient)."""
    return response_logprobs(graphdef, params, ids, mask, prompt_len, temperature, chunk_size)


# verl's per-token KL estimators of the policy from the reference, on diff = log pi - log ref.
def _low_var_kl(diff):
    kl = -diff  # k3: ratio - log ratio - 1 with ratio = ref / pi, clamped
    return jnp.clip(jnp.exp(kl) - kl - 1, -10.0, 10.0)


KL_ESTIMATORS = {
    "low_var_kl": _low_var_kl,
    "kl": lambda diff: diff,
    "mse": lambda diff: 0.5 * diff**2,
    "abs": jnp.abs,
}


def kl_penalty(log_prob, ref_log_prob, kind: str):
    """Per-token KL estimate of the policy from the reference (verl's estimators,
    `KL_ESTIMATORS`); an unknown `kind` is a ValueError."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: kind must be one of {sorted(KL_ESTIMATORS)}, got {kind!r}")
    return KL_ESTIMATORS[kind](log_prob - ref_log_prob)


# Metrics of `micro_loss` that are partial sums (divided by the whole mini-batch's counts): the
# mini-batch value is their sum over micro-batches; every other metric is weighted by tokens.
SUMMED = ("policy_loss", "kl_loss")


def micro_loss(params, graphdef, micro: UpdateBatch, num_tokens, num_seqs, sc: StepConfig,
               frozen=None):  # fmt: skip
    """(loss, metrics) of one micro-batch under `params` (joined with `frozen`, the parameters
    not differentiated, when given): the configured policy loss (divided by the whole
    mini-batch's `num_tokens` / `num_seqs`) plus the KL term when it is on."""
    lp, ent = response_logprobs(
        graphdef,
        join_trainable(params, frozen),
        micro.input_ids,
        micro.attention_mask,
        micro.prompt_len,
        sc.temperature,
        sc.chunk_size,
    )
    m = micro.response_mask
    inputs = LossInputs(
        log_prob=lp, old_log_prob=micro.old_log_prob, advantages=micro.advantages,
        response_mask=m, entropy=ent, hard=micro.hard, correct=micro.correct,
    )  # fmt: skip
    loss, metrics = LOSSES[sc.loss](
        inputs, config=sc.loss_config, num_tokens=num_tokens, num_sequences=num_seqs
    )
    if sc.use_kl_loss:
        kl = kl_penalty(lp, micro.ref_log_prob, sc.kl_loss_type)
        lc = sc.loss_config
        kl_loss = aggregate(
            kl,
            m > 0,
            lc.loss_agg_mode,
            num_tokens,
            num_seqs,
            max_response_length=lc.max_response_length,
        )
        loss = loss + sc.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    metrics["policy_loss"] = loss
    return loss, metrics


def combine_metrics(per_micro: dict, tokens) -> dict:
    """Mini-batch metrics from stacked micro-batch metrics `[n_micro]` and each micro-batch's
    response-token count: `policy_loss` / `kl_loss` (partial sums, each divided by the mini-batch
    counts) summed, every other metric weighted by tokens; `policy_loss` is returned as `loss`."""
    w = jnp.asarray(tokens, jnp.float32)
    w = w / jnp.maximum(w.sum(), 1.0)
    metrics = {k: jnp.sum(v if k in SUMMED else v * w) for k, v in per_micro.items()}
    metrics["loss"] = metrics.pop("policy_loss")
    return metrics


def update(state: TrainState, mini: UpdateBatch, graphdef, tx, sc: StepConfig):
    """One optimizer update from a mini-batch laid out `[n_micro, micro, ...]` (donated state):
    the micro-batch gradients accumulated in a `lax.scan`, then `apply_grads`. The trainer uses
    the same math one micro-batch per call (`packed_update`); this is the one-program form for
    library use (assets/make_default_model.py, benchmarks). Metrics as `combine_metrics`.
    """
    num_tokens = jnp.sum(mini.response_mask)
    num_seqs = jnp.sum(jnp.any(mini.response_mask > 0, axis=-1))
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    trainable, frozen = split_trainable(state.params, sc)

    def body(grads, micro):
        (loss, metrics), g = grad_fn(trainable, graphdef, micro, num_tokens, num_seqs, sc, frozen)
        return jax.tree.map(jnp.add, grads, g), metrics

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, per_micro = jax.lax.scan(body, zeros, mini)
    tokens = jnp.sum(mini.response_mask, axis=tuple(range(1, mini.response_mask.ndim)))
    metrics = combine_metrics(per_micro, tokens)
    state, step_metrics = apply_grads(state, grads, metrics["loss"], tx, sc)
    return state, {**metrics, **step_metrics}


def skip_if_nonfinite(loss, grad_norm, state: TrainState, params, opt_state):
    """verl skips the optimizer step when the gradient norm is not finite; so do we (and for a
    non-finite loss). Skipped: the old parameters and AdamW state are kept, only the update count
    (which drives the lr schedule, counted in RL steps like verl's scheduler) moves on.
    Returns (params, opt_state, 1.0 if skipped else 0.0)."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params = keep(params, state.params)
    opt_state = opt_state._replace(
        inner_state=keep(opt_state.inner_state, state.opt_state.inner_state)
    )
    return params, opt_state, 1.0 - finite.astype(jnp.float32)


def jit_update(graphdef, tx, sc: StepConfig, state_shardings=None):
    """`update` jitted once: static graphdef/optimizer/config closed over; TrainState donated."""
    fn = functools.partial(update, graphdef=graphdef, tx=tx, sc=sc)
    return jax.jit(
        fn,
        donate_argnums=0,
        out_shardings=(state_shardings, None) if state_shardings is not None else None,
    )


# ---------------------------------------------------------------- token-budget micro-batches
# With `optim.max_tokens_per_micro` the micro-batches of a mini-batch have different shapes
# (packing.py), so they cannot ride one `lax.scan`: each is one call of `micro_grads` (one program
# per width bucket), adding into a donated gradient accumulator, then `apply_grads` takes the
# optimizer step. Same math as `update`: every micro loss is divided by the mini-batch counts.
def micro_grads(grads, params, micro: UpdateBatch, num_tokens, num_seqs, graphdef, sc):
    """grads + d(micro loss)/d(trainable params), and the micro-batch's metrics (grads donated;
    `grads` has the structure of `split_trainable(params, sc)[0]`)."""
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    trainable, frozen = split_trainable(params, sc)
    (_, metrics), g = grad_fn(trainable, graphdef, micro, num_tokens, num_seqs, sc, frozen)
    return jax.tree.map(jnp.add, grads, g), metrics


def apply_grads(state: TrainState, grads, loss, tx, sc: StepConfig | None = None):
    """One optax step from accumulated gradients (state donated), skipped like `update`'s when
    the loss or the gradient norm is not finite; returns (state, {grad_norm, nonfinite_skipped,
    lr}). With `sc.lora` only the adapters are stepped."""
    grad_norm = optax.tree.norm(grads)
    trainable, frozen = split_trainable(state.params, sc)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = optax.apply_updates(trainable, updates)
    params, opt_state, skipped = skip_if_nonfinite(
        loss, grad_norm, state.replace(params=trainable), params, opt_state
    )
    new = state.replace(params=join_trainable(params, frozen), opt_state=opt_state,
                        step=state.step + 1)  # fmt: skip
    lr = opt_state.hyperparams["learning_rate"]
    return new, {"grad_norm": grad_norm, "nonfinite_skipped": skipped, "lr": lr}


def jit_micro_grads(graphdef, sc: StepConfig, grad_shardings=None):
    """`micro_grads` jitted; the accumulator (argument 0) is donated and keeps its sharding."""
    fn = functools.partial(micro_grads, graphdef=graphdef, sc=sc)
    out = (grad_shardings, None) if grad_shardings is not None else None
    return jax.jit(fn, donate_argnums=0, out_shardings=out)


def jit_apply_grads(tx, state_shardings=None, sc: StepConfig | None = None):
    """`apply_grads` jitted; the TrainState and the gradients are donated (the loss is not)."""
    out = (state_shardings, None) if state_shardings is not None else None
    fn = functools.partial(apply_grads, tx=tx, sc=sc)
    return jax.jit(fn, donate_argnums=(0, 1), out_shardings=out)


def packed_update(state, micros, num_tokens, num_seqs, grads_fn, apply_fn, zeros_fn):
    """One optimizer update over a list of device micro-batches of any shapes (the trainer's
    only update path: fixed-size micro-batches are equal-width ones, `packing.fixed`).

    `zeros_fn()` gives a fresh zero accumulator. Metrics as `combine_metrics`: `loss` is the sum
    of the micro losses; the others are token-weighted means over micro-batches.
    """
    grads = zeros_fn()
    per_micro, tokens = [], []
    for micro in micros:
        grads, metrics = grads_fn(grads, state.params, micro, num_tokens, num_seqs)
        per_micro.append(metrics)
        tokens.append(micro.response_mask.sum())
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_micro)
    metrics = combine_metrics(stacked, jnp.stack([jnp.asarray(x, jnp.float32) for x in tokens]))
    state, step_metrics = apply_fn(state, grads, metrics["loss"])
    metrics.update(step_metrics)
    return state, metrics
