"""`python -m htpo_jax.evaluate --model DIR_OR_RUN --data FILE... [--n 32] [--k 1,2,4] [--out DIR]`:
the paper's evaluation protocol (n samples per problem, scored by the reward that each row's
`data_source` routes to) and test-time scaling numbers, per data source.

`--model` is a run directory (its `config.yaml` and latest checkpoint, or `--step N`) or a Hugging
Face directory (`config.json` + safetensors: exported or third-party models). Sampling uses the
config's validation settings (`rollout.val_temperature`, `val_top_p`, `val_top_k`,
`max_response_length`): the run's own config for a run, else `--config` or the package defaults
(= the paper's train.sh/eval.sh: temperature 1.0, top-p 0.7, 20,480 new tokens); `--set` overrides.
For an HF directory the response length the user did not choose comes from the model: at most its
`max_position_embeddings` minus the longest prompt (a chosen one above that is capped, with a
warning), and an unchosen `algorithm.overlong_buffer_len` keeps the defaults' share of it. Only
the keys evaluate uses are checked against each other: `--set rollout.max_response_length=64`
alone is enough.

Writes into `--out` (default `<run>/eval/step_<N>`, or `./eval` for an HF directory):
- `responses.jsonl`: one row per response: `file`, `problem` (index of the problem among the
  valid rows of its file), `data_source`, `sample`, `response`, `length`, `finished`, `score`,
  `acc`, `pred`;
- `summary.json`: `{data_source: {"n", "problems", "mean@<n>", "pass@k": {k: ..}, "maj@k": {k:
  ..}, "response_length_mean", "truncation_rate"}}`.

The estimators (pass@k, maj@k) and `validate` are in `rl/validation.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
from flax import nnx

from htpo_jax.infra.distributed import HostSync
from htpo_jax.models.hf_io import load_tokenizer
from htpo_jax.rewards import RewardPools
from htpo_jax.rewards.routing import UnknownDataSource, check_sources
from htpo_jax.rl.validation import sample_val, summarize
from htpo_jax.rollout import Sampler
from htpo_jax.run import preflight
from htpo_jax.run.checkpoint import CheckpointMismatch
from htpo_jax.run.config import (
    AlgorithmConfig,
    Config,
    ConfigError,
    RolloutConfig,
    config_from_dict,
    load_config,
    load_tree,
)
from htpo_jax.run.data import DataError, val_dataset
from htpo_jax.run.policy import NonFiniteWeights, build_model, checkpoint_steps, restore_run
from htpo_jax.run.preflight import LaunchError

log = logging.getLogger("htpo_jax.evaluate")


class EvalInputError(ValueError):
    """Bad command-line input (model path, --k, --step): one line, exit 2."""


# ---------------------------------------------------------------- the policy
# The keys whose unchosen values an HF directory's model decides (see `fit_to_model`).
FITTED_KEYS = ("rollout.max_response_length", "algorithm.overlong_buffer_len")


def load_policy(model_dir: str, step: int | None, config: str | None, overrides: Sequence[str]):
    """(model, tokenizer, cfg, default out dir, step or None, keys to fit) of a run or an HF
    directory. `keys to fit` (None for a run) are those of FITTED_KEYS the user did not set:
    `evaluate` sizes them from the model once the prompts are read."""
    path = Path(model_dir)
    if (path / "config.yaml").is_file():  # a run: its config, the checkpoint's parameters
        config_file = config or path / "config.yaml"
        cfg = load_config(config_file, list(overrides), cross_checks=False)
        check_eval_config(cfg)
        _check_model(cfg, f"model.path in {config_file}")
        ckpt_dir, steps = checkpoint_steps(path, cfg)  # creates nothing
        if not steps:
            raise EvalInputError(f"--model {model_dir}: no checkpoint in {ckpt_dir}")
        if step is not None and step not in steps:
            raise EvalInputError(f"--step {step}: no such checkpoint in {ckpt_dir}; have {steps}")
        model, cfg, step = restore_run(path, step, cfg=cfg)  # a LoRA run's adapters on its base
        return model, _tokenizer(cfg), cfg, path / "eval" / f"step_{step}", step, None
    if (path / "config.json").is_file():  # an HF directory
        if step is not None:
            raise EvalInputError(f"--step {step}: {model_dir} is an HF directory, not a run")
        tree = load_tree(config, list(overrides), cross_checks=False)  # no --config: defaults
        chosen = {f"{s}.{k}" for s, body in tree.items() if isinstance(body, dict) for k in body}
        cfg = config_from_dict(tree, cross_checks=False)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)))
        _check_model(cfg, "--model")
        fit = frozenset(k for k in FITTED_KEYS if k not in chosen)
        if not fit:  # both chosen: a clash between them is known before the model loads
            check_eval_config(cfg)
        return build_model(cfg), _tokenizer(cfg), cfg, Path("eval"), None, fit
    raise EvalInputError(
        f"--model {model_dir}: neither a run directory (config.yaml) nor an HF directory "
        "(config.json)"
    )


def _check_model(cfg: Config, what: str) -> None:
    """The model and tokenizer directories, in one line each, before anything loads."""
    preflight.check_model_dir(cfg.model.path, what)
    tok_key = "model.tokenizer_path" if cfg.model.tokenizer_path else what
    preflight.check_model_dir(cfg.model.tokenizer_path or cfg.model.path, tok_key, tokenizer=True)


def check_eval_config(cfg: Config) -> None:
    """The one check between keys that evaluate relies on (the scoring's overlong buffer inside
    the response length); training's checks (batch sizes, warm-up, mesh) are not its business."""
    a, r = cfg.algorithm, cfg.rollout
    if a.overlong_buffer_enable and a.overlong_buffer_len >= r.max_response_length:
        raise ConfigError(
            f"algorithm.overlong_buffer_len: must be < rollout.max_response_length "
            f"({r.max_response_length}), got {a.overlong_buffer_len} (or set "
            "algorithm.overlong_buffer_enable=false)"
        )


def fit_to_model(cfg: Config, positions: int, longest_prompt: int, fit: frozenset) -> Config:
    """`cfg` with the response length inside the model's positions (`positions` =
    max_position_embeddings, `longest_prompt` in tokens): an unchosen length (in `fit`) becomes
    min(its default, room), a chosen one above the room is capped with a warning; an unchosen
    overlong buffer keeps the defaults' share of the length. Then `check_eval_config`."""
    room = positions - longest_prompt
    if room < 1:
        raise EvalInputError(
            f"--data: the longest prompt has {longest_prompt} tokens and the model "
            f"max_position_embeddings={positions}: no room for a response (lower "
            "data.max_prompt_length)"
        )
    r, a = cfg.rollout, cfg.algorithm
    length = r.max_response_length
    if "rollout.max_response_length" in fit:
        length = min(length, room)
        if length != r.max_response_length:
            log.info(
                "rollout.max_response_length=%d: the model's %d positions minus the longest "
                "prompt (%d tokens)", length, positions, longest_prompt,
            )  # fmt: skip
    elif length > room:
        log.warning(
            "rollout.max_response_length=%d does not fit the model's %d positions after a "
            "%d-token prompt: capped at %d", length, positions, longest_prompt, room,
        )  # fmt: skip
        length = room
    buffer, enable = a.overlong_buffer_len, a.overlong_buffer_enable
    if "algorithm.overlong_buffer_len" in fit:
        share = AlgorithmConfig.overlong_buffer_len / RolloutConfig.max_response_length
        buffer = max(1, round(length * share))
        if buffer >= length:  # a 1-token response has no room for a buffer
            enable = False
    cfg = dataclasses.replace(
        cfg,
        rollout=dataclasses.replace(r, max_response_length=length),
        algorithm=dataclasses.replace(a, overlong_buffer_len=buffer, overlong_buffer_enable=enable),
    )
    check_eval_config(cfg)
    return cfg


def _tokenizer(cfg: Config):
    return load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)


# ---------------------------------------------------------------- sampling
def evaluate(
    model, tokenizer, cfg: Config, files: Sequence[str], n: int, ks, *, seed: int, fit=None
):
    """Sample n responses per problem of every file; returns (records, summary). `fit`: the
    keys `fit_to_model` sizes from the model once the prompts are known (None: `cfg` as is)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_files=tuple(files)))
    datasets = []
    for f in files:  # read and check every file before any sampling
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_files=(f,)))
        ds = val_dataset(one, tokenizer)
        check_sources([r.data_source for r in ds.rows], cfg, f)
        datasets.append((f, ds))
    if fit is not None:
        longest = max(
            (len(ids) for _, ds in datasets for ids in ds.encode(range(len(ds)))), default=0
        )
        cfg = fit_to_model(cfg, model.cfg.max_position_embeddings, longest, fit)
    key = jax.random.key(seed)
    sync = HostSync("evaluate", cfg.trainer.collective_timeout_s)
    sampler, params = Sampler.from_model(model, sync=sync), nnx.state(model)
    records: list[dict] = []
    with RewardPools() as pools:  # verifier workers, if any, for the whole evaluation
        for fi, (f, ds) in enumerate(datasets):
            for bi, batch in enumerate(ds.iter_batches(cfg.data.val_batch_size)):
                rng = jax.random.fold_in(jax.random.fold_in(key, fi), bi)
                s = sample_val(sampler, params, tokenizer, batch, cfg, rng=rng, n=n, pools=pools)
                for i in range(len(batch) * n):
                    records.append(
                        {
                            "file": str(f),
                            "problem": batch.row_ids[i // n],
                            "data_source": batch.data_source[i // n],
                            "sample": i % n,
                            "response": s.texts[i],
                            "length": int(s.lengths[i]),
                            "finished": bool(s.finished[i]),
                            "score": float(s.score[i]),
                            "acc": bool(s.acc[i]),
                            "pred": s.pred[i],
                        }
                    )
                log.info(
                    "%s: %d/%d problems",
                    f,
                    min((bi + 1) * cfg.data.val_batch_size, len(ds)),
                    len(ds),
                )
    return records, summarize(records, ks)


def write(out: Path, records: list[dict], summary: dict) -> None:
    """responses.jsonl and summary.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "responses.jsonl").open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def parse_ks(text: str | None, n: int) -> list[int]:
    """'1,2,4' or '1-64' (or a mix); default: powers of two up to n, and n."""
    if not text:
        ks = {1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n}
        return sorted(ks)
    ks = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            lo, hi = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise EvalInputError(f"--k {text!r}: expected integers like 1,2,4 or 1-64") from None
        if lo > hi:  # range() would give nothing: "3-1" was read as no k at all
            raise EvalInputError(
                f"--k {text!r}: the range {part.strip()} runs backwards (low-high, e.g. {hi}-{lo})"
            )
        ks |= set(range(lo, hi + 1))
    bad = sorted(k for k in ks if not 0 < k <= n)
    if bad:
        raise EvalInputError(f"--k {text!r}: every k must be in [1, n={n}], got {bad}")
    return sorted(ks)


def main(argv=None) -> dict:
    """Samples --n responses per problem, scores them, writes responses.jsonl and summary.json (and
    passk.png with --plot) and returns the summary; bad input exits 2."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="run directory or HF directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of a run (latest)")
    ap.add_argument("--data", nargs="+", required=True, help=".parquet / .jsonl files")
    ap.add_argument("--n", type=int, default=32, help="samples per problem (default 32)")
    ap.add_argument("--k", default=None, help="k of pass@k / maj@k: 1,2,4 or 1-64")
    ap.add_argument("--out", default=None, help="output directory")
    ap.add_argument("--config", default=None, help="config YAML (default: the run's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (trainer.seed)")
    ap.add_argument("--plot", action="store_true", help="also write passk.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.n < 1:
            raise EvalInputError(f"--n must be >= 1, got {args.n}")
        ks = parse_ks(args.k, args.n)
        model, tok, cfg, out, step, fit = load_policy(args.model, args.step, args.config, args.set)
        seed = cfg.trainer.seed if args.seed is None else args.seed
        records, summary = evaluate(model, tok, cfg, args.data, args.n, ks, seed=seed, fit=fit)
    except (EvalInputError, ConfigError, DataError, UnknownDataSource, LaunchError,
            NonFiniteWeights, CheckpointMismatch) as e:  # fmt: skip
        print(f"htpo_jax.evaluate: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out) if args.out else out
    write(out, records, summary)
    if args.plot:
        from htpo_jax.tools.plot import passk_figure

        passk_figure({Path(args.model).name: [summary]}, out / "passk.png")
    for source, s in summary.items():
        pk = ", ".join(f"pass@{k} {v:.3f}" for k, v in s["pass@k"].items())
        mean_key = f"mean@{s['n']}"
        print(f"{source}: {mean_key} {s[mean_key]:.3f}, {pk}")
    print(f"wrote {out / 'responses.jsonl'} and {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
