"""Rollouts: n sampled responses per prompt, by continuous batching over a paged KV cache.

    rollout = generate(model, prompt_ids, prompt_mask, max_new_tokens=..., rng=key, n=16,
                       temperature=1.0, top_p=1.0, top_k=-1, eos_token_id=[...], pad_token_id=0)

or, in a loop whose parameters change (the trainer), built once and called with the params:

    sampler = Sampler.from_model(model)   # or Sampler(StaticGraph(graphdef), cfg, dtype)
    rollout = sampler(params, prompt_ids, prompt_mask, max_new_tokens=..., ...)

Prompts are left padded ([B, P], mask 1 on real tokens; every row needs at least one). With
`n > 1` each prompt is sampled n times (rows `i*n .. i*n+n-1` belong to prompt i; the prompt is
prefilled once). The result, a `Rollout`, holds per response row: `tokens [B, N]` (pad_token_id
after the end), `response_mask [B, N]` (1 up to and including the first EOS), `log_probs [B, N]`,
`lengths [B]` and `finished [B]` (ended with EOS, i.e. not truncated at N = max_new_tokens).

Checked at the entry (`sampling.check_args`, one ValueError naming the argument, on host values
and static shapes): `rng` any single PRNG key, a typed key of any impl (`jax.random.key(s)`,
`impl="rbg"`) or legacy raw uint32[2] data (`jax.random.PRNGKey(s)`, read as the threefry key, so
it samples exactly what `jax.random.key(s)` does); prompt ids / mask both [B, P], integer ids in
[0, vocab) at the real tokens; a finite temperature (<= 0: greedy); top_k an int >= -1 (-1 or 0:
off); a float `cache_dtype`; `engine` None / "paged" (the engine), "static" or an `EngineConfig`.
N is capped at the model's `max_position_embeddings` minus the longest prompt (real tokens), with
a warning; a prompt that leaves no room is an error.

Modules:
  sampling.py         the Rollout type, buckets, the sampling math and the per-row key rule
  engine.py           the default sampler: continuous batching over a paged KV cache
  scheduler.py        the engine's host side: page allocator, admission, preemption, packing
  paged_attention.py  page pool layout, k/v writes, decode attention over pages (TPU kernel)
  static.py           the simple reference: one dense [B, P + N] cache, all rows to the end
docs/ROLLOUT.md has the design, the config keys and the memory arithmetic.

The log-prob contract
---------------------
`log_probs[b, i] = log softmax(z / tau)[tokens[b, i]]`, z the float32 logits and tau the
temperature: the log-prob of the sampled token under the temperature-scaled FULL distribution,
NOT the top-p / top-k truncated one that the token was actually drawn from. That is exactly what
`models.logprobs.logprobs_and_entropy(model, ids, mask, temperature=tau)` computes for the same
sequence (prompt + response), so the trainer's old log-probs and these agree (float32: to ~1e-6;
a bf16 model differs by bf16 rounding between the cached and the full forward). Greedy decoding
(`greedy=True` or `temperature <= 0`) reports log-probs at tau = temperature, or at tau = 1 when
temperature <= 0. Zeros after the end.

Sampling order (as transformers and vLLM): temperature, then top-k, then top-p on the top-k
renormalized distribution. Each row draws from its own key, `fold_in(fold_in(rng, row), step)`:
a row's output does not depend on the batch, the slot it decodes in, when it was admitted, or
which sampler ran it (engine and static sampler give the same tokens for the same rng).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from flax import nnx

from htpo_jax.infra.distributed import HostSync
from htpo_jax.rollout import engine as engine_lib
from htpo_jax.rollout import sampling, static
from htpo_jax.rollout.engine import EngineConfig, generate_paged
from htpo_jax.rollout.sampling import (
    Rollout,
    StaticGraph,
    argmax_last,
    bucket,
    full_sequences,
    prompt_bucket,
    repeat_prompts,
    sample_logits,
)

__all__ = [
    "EngineConfig",
    "Rollout",
    "Sampler",
    "argmax_last",
    "bucket",
    "compile_count",
    "full_sequences",
    "generate",
    "prompt_bucket",
    "repeat_prompts",
    "sample_logits",
]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A model's sampler in (graphdef, params) form: built once from the model's structure,
    called with the current parameters (`sampler(params, prompt_ids, prompt_mask, ...)`), so a
    trainer keeps one copy of its parameters and hands the sampler whichever are current.
    The compiled programs live in jax's own jit cache, keyed by the graphdef (`StaticGraph`),
    the static configuration and the shape bucket (`compile_count` counts them)."""

    graph: StaticGraph
    model_cfg: object  # the decoder's ModelConfig: layer / head sizes for the engine's KV pages
    dtype: object  # the model's compute dtype: the default KV-cache dtype
    attention_chunk_size: int | None = None  # the engine's prefill query block (None: 1024)
    # Host sync points of a multi-process call (the engine's pool size, the reward scoring); one
    # process: none needed. Not part of the sampler's identity.
    sync: HostSync | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_model(cls, model, sync: HostSync | None = None) -> Sampler:
        """The sampler of an NNX decoder (its structure only; pass its parameters per call);
        `sync`: the caller's `HostSync` when several processes run it."""
        chunk = getattr(model, "attention_chunk_size", None)
        return cls(StaticGraph(nnx.graphdef(model)), model.cfg, model.dtype, chunk, sync)

    def __call__(
        self,
        params,
        prompt_ids,
        prompt_mask,
        *,
        max_new_tokens: int,
        rng=None,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        greedy: bool = False,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int = 0,
        cache_dtype=None,
        batch_bucket=bucket,
        length_bucket=prompt_bucket,
        engine: EngineConfig | str | None = None,
        stats: dict | None = None,
    ) -> Rollout:
        """Samples `n` responses per left-padded prompt under `params`; see the package docstring.

        params: the model's `nnx.State` (as `nnx.split` gives it). prompt_ids, prompt_mask:
        [B, P] (numpy or jax); rng: a PRNG key, typed or raw `PRNGKey` data (ignored when
        greedy). max_new_tokens: capped at the model's positions minus the longest prompt (a
        warning). `cache_dtype` (a float dtype) defaults to the model's compute dtype. `engine`:
        an `EngineConfig` (None or "paged": the defaults, sized from free memory; under a mesh
        whose data x fsdp axes split the batch, one engine per batch shard) or "static" for the
        dense reference sampler, whose shapes `batch_bucket` / `length_bucket` round (the
        engine ignores them). `stats` (a dict, engine only) receives the run's counters (rounds,
        preemptions, peak KV bytes). Bad arguments: one ValueError naming the argument (see the
        package docstring). Returns a `Rollout` of B * n rows.
        """
        kw = sampling.check_args(
            prompt_ids, prompt_mask, model_cfg=self.model_cfg, max_new_tokens=max_new_tokens,
            rng=rng, n=n, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
            eos_token_id=eos_token_id, cache_dtype=cache_dtype, model_dtype=self.dtype,
        )  # fmt: skip
        kw["pad_token_id"] = int(pad_token_id)
        if engine == "paged":  # the config's name for the engine (`rollout.engine: paged`)
            engine = None
        if engine == "static":
            return static.sample(
                self, params, prompt_ids, prompt_mask, batch_bucket=batch_bucket,
                length_bucket=length_bucket, **kw,
            )  # fmt: skip
        if not (engine is None or isinstance(engine, EngineConfig)):
            raise ValueError(
                f"generate: engine must be an EngineConfig, 'paged' or 'static', got {engine!r}"
            )
        # Under a mesh whose data x fsdp axes split the batch: one engine per batch shard (every
        # process runs all shards' schedulers, in lockstep; each feeds its own devices).
        mesh = jax.sharding.get_mesh()
        if mesh.empty or engine_lib.batch_shards(mesh) == 1:
            mesh = None
        return generate_paged(
            self, params, prompt_ids, prompt_mask, config=engine or EngineConfig(), stats=stats,
            mesh=mesh, **kw,
        )  # fmt: skip


def generate(model, prompt_ids, prompt_mask, **kwargs) -> Rollout:
    """`Sampler.from_model(model)` called with the model's current parameters: the same
    keyword arguments and `Rollout` as `Sampler.__call__` (see the package docstring). A loop
    that samples often builds its `Sampler` once instead."""
    graphdef, params = nnx.split(model)
    chunk = getattr(model, "attention_chunk_size", None)
    sampler = Sampler(StaticGraph(graphdef), model.cfg, model.dtype, chunk)
    return sampler(params, prompt_ids, prompt_mask, **kwargs)


def compile_count() -> int:
    """Programs in jax's cache for the samplers (static generate, engine prefill and decode)."""
    programs = (static.generate_program, engine_lib.prefill_program, engine_lib.decode_program)
    return sum(p._cache_size() for p in programs)
