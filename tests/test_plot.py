"""`python -m htpo_jax.plot`: pass@k and training-curve PNGs that open, have the asked size and
are not blank; several directories under one label become one curve with a spread."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")  # in the [test] extra; `[plot]` for users
import matplotlib.image as mpimg  # noqa: E402

from htpo_jax.tools.plot import GROUPS, labelled, main  # noqa: E402


def _summary(path, scale):
    ks = [1, 2, 4, 8]
    s = {"arith": {"n": 8, "problems": 10, "mean@8": 0.3 * scale,
                   "pass@k": {str(k): min(1.0, 0.3 * scale * k**0.5) for k in ks},
                   "maj@k": {str(k): 0.3 for k in ks}}}  # fmt: skip
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(s))
    return path


def _run(path, seed):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    lines = []
    for step in range(1, 21):
        rec = {"step": step, "train/reward_mean": step / 20 + rng.normal(0, 0.05),
               "train/accuracy": 0.3 + step / 40, "train/entropy": 0.1 - step / 400,
               "response_length/mean": 30 + rng.normal()}  # fmt: skip
        rec.update({g: 1 / 8 for g in GROUPS})
        if step % 10 == 0:
            rec["val/accuracy"] = 0.3 + step / 50
        lines.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def _check_png(path, min_w, min_h):
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    assert img[..., :3].std() > 0.01  # something is drawn


def test_passk_figure_with_seed_spread(tmp_path):
    dirs = [f"htpo={_summary(tmp_path / f'h{i}', 1 + 0.1 * i)}" for i in range(3)]
    dirs += [f"dapo={_summary(tmp_path / f'd{i}', 0.9 + 0.1 * i)}" for i in range(3)]
    out = main(["passk", *dirs, "--out", str(tmp_path / "passk.png")])
    _check_png(out, 500, 400)


def test_curves_figure(tmp_path):
    runs = [f"htpo={_run(tmp_path / 'a', 0)}", f"htpo={_run(tmp_path / 'b', 1)}"]
    runs += [str(_run(tmp_path / "dapo_run", 2))]
    out = main(["curves", *runs, "--out", str(tmp_path / "curves.png")])
    _check_png(out, 1200, 700)


def test_labels_group_directories():
    assert labelled(["a=x", "b=y", "a=z", "w/run"]) == {
        "a": [Path("x"), Path("z")],
        "b": [Path("y")],
        "run": [Path("w/run")],
    }


def test_missing_input_is_one_line_and_exit_2(tmp_path, capsys):
    for argv in (["passk", str(tmp_path / "nothing")], ["curves", str(tmp_path / "nothing")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "not found" in err[0], err


def test_out_into_a_missing_directory_is_created(tmp_path, capsys):
    """Before: matplotlib's FileNotFoundError traceback (issue 20 item 8)."""
    runs = [str(_run(tmp_path / "r", 0))]
    out = tmp_path / "figs" / "new" / "curves.png"
    assert main(["curves", *runs, "--out", str(out)]) == out
    _check_png(out, 800, 400)
    (tmp_path / "blocker").write_text("")  # a file where the directory would go: one line
    with pytest.raises(SystemExit) as e:
        main(["curves", *runs, "--out", str(tmp_path / "blocker" / "c.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--out" in err[0] and "blocker" in err[0], err
