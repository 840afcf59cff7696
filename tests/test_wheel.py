"""A wheel built from the repository ships the package only (no configs/, no assets/): its
`python -m htpo_jax.train` says which files of a source checkout are missing (issue 20 item 9),
where it said `model.path is empty`."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from htpo_jax.run import train as T

ROOT = Path(__file__).resolve().parents[1]


def test_default_run_files_are_what_the_default_config_reads():
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    read = [cfg["model"]["path"], *cfg["data"]["train_files"], *cfg["data"]["val_files"]]
    rel = {
        (ROOT / "configs" / p).resolve().relative_to(ROOT).as_posix()
        + ("/" if (ROOT / "configs" / p).is_dir() else "")
        for p in read
    }
    assert {"configs/default.yaml", *rel} == set(T.DEFAULT_RUN_FILES)
    assert T.DEFAULT_CONFIG == ROOT / "configs" / "default.yaml"


def test_train_without_the_default_run_names_the_missing_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "DEFAULT_CONFIG", tmp_path / "configs" / "default.yaml")
    with pytest.raises(SystemExit) as e:
        T.main([])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: {T.no_default_run_message()}"], err
    for f in T.DEFAULT_RUN_FILES:
        assert f in err[0]
    assert "source checkout" in err[0] and "--config" in err[0]
    # a run described by --set alone is not the default run: no such message
    with pytest.raises(SystemExit) as e:
        T.main(["--set", f"model.path={tmp_path / 'nope'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: model.path: "), err


@pytest.mark.slow
def test_the_wheel_says_what_a_source_checkout_has(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the wheel is built from its tracked files)")
    src = tmp_path / "src"  # the working tree's tracked files: no build/ left in the checkout
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        f = ROOT / os.fsdecode(name)
        if f.is_file():
            (src / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src / f.relative_to(ROOT))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w")],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "w").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith(("configs/", "assets/"))]
    assert "htpo_jax/run/train.py" in names
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
    where = subprocess.run(
        [sys.executable, "-c", "import htpo_jax; print(htpo_jax.__file__)"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(target)), where  # the wheel's copy, not the checkout
    proc = subprocess.run(
        [sys.executable, "-m", "htpo_jax.train"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no --config given") and "configs/default.yaml" in lines[0]
    assert "assets/arith_model/" in lines[0] and "source checkout" in lines[0]
