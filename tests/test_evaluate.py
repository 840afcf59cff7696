"""`python -m htpo_jax.evaluate`: the estimators against brute force and hand-made answers, the
per-data-source split, the shipped default model end to end (HF and run directories), and one
line + exit 2 for bad input."""

import itertools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from htpo_jax.models.hf_io import from_pretrained
from htpo_jax.rl.train_step import TrainState, make_optimizer
from htpo_jax.rl.validation import maj_at_k, majority_correct, pass_at_k, summarize
from htpo_jax.run.checkpoint import Checkpointer
from htpo_jax.run.config import ConfigError, dump_yaml, load_config
from htpo_jax.tools.evaluate import EvalInputError, fit_to_model, load_policy, main, parse_ks

ROOT = Path(__file__).resolve().parent.parent
MODEL, DEFAULT = ROOT / "assets" / "arith_model", ROOT / "configs" / "default.yaml"


# ---------------------------------------------------------------- estimators
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_pass_at_k_equals_brute_force_over_all_subsets(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(correct, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(64, 1, 1) == pytest.approx(1 / 64)
    assert pass_at_k(64, 3, 10) == pytest.approx(1 - math.comb(61, 10) / math.comb(64, 10))


def test_majority_vote_on_hand_made_answers():
    # answer "7" is right; "5" wrong; no-answer markers never vote
    assert majority_correct(["7", "5", "7"], [True, False, True])
    assert not majority_correct(["5", "7", "5"], [False, True, False])
    assert majority_correct(["[INVALID]", "[INVALID]", "7"], [False, False, True])
    assert not majority_correct(["[INVALID]", ""], [False, False])
    assert not majority_correct(["5", "7"], [False, True])  # tie: first seen wins
    assert majority_correct(["7", "5"], [True, False])
    preds = ["7", "5", "5", "5", "7", "7", "1", "7"]
    accs = [p == "7" for p in preds]
    assert maj_at_k(preds, accs, 1) == pytest.approx(4 / 8)  # = mean accuracy
    assert maj_at_k(preds, accs, 2) == pytest.approx(2 / 4)  # (7,5) (5,5) (7,7) (1,7)
    assert maj_at_k(preds, accs, 4) == pytest.approx(1 / 2)  # (7,5,5,5) no, (7,7,1,7) yes
    assert maj_at_k(preds, accs, 8) == 1.0  # four 7s, three 5s
    assert maj_at_k(preds, accs, 3) == pytest.approx(1 / 2)  # (7,5,5) no, (5,7,7) yes


def test_summary_is_split_by_data_source():
    def rec(source, problem, accs, preds, file="f.jsonl"):
        return [
            {"file": file, "problem": problem, "data_source": source, "sample": i,
             "acc": a, "pred": p, "length": 10 + i, "finished": i != 0}
            for i, (a, p) in enumerate(zip(accs, preds, strict=True))
        ]  # fmt: skip

    records = rec("aime24", 0, [True, False, False, False], ["1", "2", "3", "4"])
    records += rec("aime24", 1, [False] * 4, ["9", "9", "8", "[INVALID]"])
    records += rec("math", 0, [True, True, False, True], ["5", "5", "6", "5"], file="g.jsonl")
    s = summarize(records, [1, 2, 4])
    assert sorted(s) == ["aime24", "math"]
    a, m = s["aime24"], s["math"]
    assert a["n"] == 4 and a["problems"] == 2 and m["problems"] == 1
    assert a["mean@4"] == pytest.approx(1 / 8) and m["mean@4"] == pytest.approx(3 / 4)
    assert a["pass@k"]["4"] == pytest.approx(0.5)  # one of two problems ever right
    assert a["pass@k"]["2"] == pytest.approx((pass_at_k(4, 1, 2) + 0) / 2)
    assert m["pass@k"]["1"] == pytest.approx(3 / 4) and m["maj@k"]["4"] == 1.0
    assert a["maj@k"]["4"] == pytest.approx(0.5)  # problem 0: all differ, "1" first -> right
    assert a["truncation_rate"] == pytest.approx(0.25) and a["response_length_mean"] == 11.5


def test_parse_ks():
    assert parse_ks(None, 64) == [1, 2, 4, 8, 16, 32, 64]
    assert parse_ks(None, 6) == [1, 2, 4, 6]
    assert parse_ks("1-4,8", 8) == [1, 2, 3, 4, 8]
    # before: "3-1" was read as an empty range, and an empty list of k accepted
    with pytest.raises(EvalInputError, match="the range 3-1 runs backwards"):
        parse_ks("3-1", 8)
    with pytest.raises(EvalInputError, match="expected integers"):
        parse_ks("2-", 8)


# ---------------------------------------------------------------- end to end
def _small_data(tmp_path, n=6):
    """The first validation problems; half of them relabelled as an AIME source."""
    lines = (ROOT / "assets" / "arith" / "val.jsonl").read_text().splitlines()[:n]
    rows = [json.loads(x) for x in lines]
    for r in rows[n // 2 :]:
        r["data_source"] = "aime24"
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check_outputs(out: Path, n_problems: int, n: int):
    recs = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert len(recs) == n_problems * n
    for key in ("problem", "data_source", "response", "length", "score", "acc", "pred"):
        assert key in recs[0], key
    summary = json.loads((out / "summary.json").read_text())
    assert summary == summarize(recs, sorted(int(k) for k in summary["arith"]["pass@k"]))
    return recs, summary


@pytest.mark.slow
def test_evaluate_the_shipped_model(tmp_path):
    data, out = _small_data(tmp_path), tmp_path / "eval"
    argv = ["--model", str(MODEL), "--config", str(DEFAULT), "--data", str(data)]
    main([*argv, "--n", "4", "--k", "1,2,4", "--out", str(out), "--plot"])
    recs, summary = _check_outputs(out, 6, 4)
    assert sorted(summary) == ["aime24", "arith"] and summary["arith"]["problems"] == 3
    assert [r["problem"] for r in recs[::4]] == list(range(6))  # index in its file
    assert {r["score"] for r in recs} <= {1.0, -1.0}
    assert any(r["acc"] for r in recs)  # the model is right ~30% of the time
    assert all(r["response"].strip() for r in recs)
    assert (out / "passk.png").stat().st_size > 1000


@pytest.mark.slow
def test_evaluate_a_run_directory_checkpoint(tmp_path):
    """A run directory: its config and the checkpoint named by --step (default out dir)."""
    run = tmp_path / "run"
    cfg = load_config(DEFAULT, [f"trainer.output_dir={run}"])
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(cfg))
    model = from_pretrained(MODEL, dtype=jnp.float32)
    _, params = nnx.split(model)
    params = jax.tree.map(lambda x: x * 0, params)  # a zero policy: uniform over the vocabulary
    tx = make_optimizer(cfg.optim, 1)
    with Checkpointer(run / "checkpoints") as ck:
        ck.save(3, TrainState.create(params, tx))
    data = _small_data(tmp_path, n=2)
    main(["--model", str(run), "--step", "3", "--data", str(data), "--n", "2"])
    recs = [json.loads(x) for x in (run / "eval" / "step_3" / "responses.jsonl").open()]
    assert len(recs) == 4 and not any(r["acc"] for r in recs)  # uniform tokens: never right


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing", "data file not found"),
        ("unknown_source", "no reward for data_source 'gsm8k_mystery'"),
        ("bad_k", "--k"),
        ("backwards_k", "runs backwards"),
        ("bad_model", "neither a run directory"),
        ("gpt2", "model_type='gpt2' in config.json is not supported"),
        ("yarn", "rope_type='yarn' is not supported"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, needle):
    data = tmp_path / "d.jsonl"
    row = json.loads((ROOT / "assets" / "arith" / "val.jsonl").read_text().splitlines()[0])
    row["data_source"] = "gsm8k_mystery" if case == "unknown_source" else row["data_source"]
    data.write_text(json.dumps(row) + "\n")
    model = str(tmp_path) if case == "bad_model" else str(MODEL)
    if case in ("gpt2", "yarn"):  # before: a ValueError traceback from the model load
        model = tmp_path / "model"
        shutil.copytree(MODEL, model)
        config = json.loads((model / "config.json").read_text())
        if case == "gpt2":
            config["model_type"] = "gpt2"
        else:
            config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
        (model / "config.json").write_text(json.dumps(config))
    argv = ["--model", str(model), "--config", str(DEFAULT), "--data"]
    argv += [str(tmp_path / "nope.jsonl") if case == "missing" else str(data)]
    k = {"bad_k": "1,3", "backwards_k": "2-1"}.get(case, "1,2")
    argv += ["--n", "2", "--k", k]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# ---------------------------------------------------------------- an HF directory's defaults
def test_hf_dir_takes_the_response_length_from_the_model(tmp_path):
    """Before: the package defaults (20,480 new tokens on a 512-position model), and
    `--set rollout.max_response_length=64` refused because of algorithm.overlong_buffer_len."""
    model, _, cfg, _, _, fit = load_policy(str(MODEL), None, None, [])
    assert fit == {"rollout.max_response_length", "algorithm.overlong_buffer_len"}
    assert model.cfg.max_position_embeddings == 512
    fitted = fit_to_model(cfg, 512, 40, fit)
    assert fitted.rollout.max_response_length == 472  # 512 positions - the 40-token prompt
    assert fitted.algorithm.overlong_buffer_len == round(472 * 4096 / 20480)  # the same share
    # the command: one key, no --config
    _, _, cfg, _, _, fit = load_policy(str(MODEL), None, None, ["rollout.max_response_length=64"])
    assert fit == {"algorithm.overlong_buffer_len"}
    fitted = fit_to_model(cfg, 512, 40, fit)
    assert fitted.rollout.max_response_length == 64
    assert fitted.algorithm.overlong_buffer_len == 13 and fitted.algorithm.overlong_buffer_enable
    # a chosen length that does not fit is capped; a chosen clash is one line naming the keys
    _, _, cfg, _, _, fit = load_policy(str(MODEL), None, None, ["rollout.max_response_length=999"])
    assert fit_to_model(cfg, 512, 40, fit).rollout.max_response_length == 472
    both = ["rollout.max_response_length=64", "algorithm.overlong_buffer_len=64"]
    with pytest.raises(ConfigError, match="algorithm.overlong_buffer_len: must be < rollout"):
        load_policy(str(MODEL), None, None, both)
    with pytest.raises(EvalInputError, match="longest prompt has 600 tokens.*=512"):
        fit_to_model(cfg, 512, 600, fit)


def test_evaluate_an_hf_dir_with_one_response_length_key(tmp_path, capsys):
    """The issue's command, end to end: an HF directory, no --config, one --set."""
    data, out = _small_data(tmp_path, n=2), tmp_path / "eval"
    argv = ["--model", str(MODEL), "--data", str(data), "--n", "2", "--out", str(out)]
    summary = main([*argv, "--set", "rollout.max_response_length=24", "data.val_batch_size=2"])
    recs = [json.loads(x) for x in (out / "responses.jsonl").open()]
    assert len(recs) == 4 and max(r["length"] for r in recs) <= 24
    assert sorted(summary) == ["aime24", "arith"]


def test_a_run_without_checkpoint_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """Before: the Checkpointer made an empty checkpoints/ in the run dir on the way out."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(load_config(DEFAULT, [f"trainer.output_dir={run}"])))
    data = _small_data(tmp_path, n=2)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(run), "--data", str(data), "--n", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"htpo_jax.evaluate: --model {run}: no checkpoint in "
                                         f"{run / 'checkpoints'}"], err  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
