"""`python -m htpo_jax.evaluate`: the estimators against brute force and hand-made answers, the
per-data-source split, the shipped default model end to end (HF and run directories), and one
line + exit 2 for bad input."""

import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from htpo_jax.models.hf_io import from_pretrained
from htpo_jax.rl.train_step import TrainState, make_optimizer
from htpo_jax.rl.validation import maj_at_k, majority_correct, pass_at_k, summarize
from htpo_jax.run.checkpoint import Checkpointer
from htpo_jax.run.config import dump_yaml, load_config
from htpo_jax.tools.evaluate import main, parse_ks

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
        ck.save(3, TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.key(0)))
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
        ("bad_model", "neither a run directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, needle):
    data = tmp_path / "d.jsonl"
    row = json.loads((ROOT / "assets" / "arith" / "val.jsonl").read_text().splitlines()[0])
    row["data_source"] = "gsm8k_mystery" if case == "unknown_source" else row["data_source"]
    data.write_text(json.dumps(row) + "\n")
    model = str(tmp_path) if case == "bad_model" else str(MODEL)
    argv = ["--model", model, "--config", str(DEFAULT), "--data"]
    argv += [str(tmp_path / "nope.jsonl") if case == "missing" else str(data)]
    argv += ["--n", "2", "--k", "1,3" if case == "bad_k" else "1,2"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
