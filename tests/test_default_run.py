"""The README's figure is what the README's command prints (issue 20, item 10).

`python -m htpo_jax.train` (configs/default.yaml, 100 RL steps, ~6 min on 2 cores) runs in a
subprocess; its final summary line must match the README's within the noise the README states.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"val/accuracy: (\d\.\d+) \(start\) -> (\d\.\d+) \(after step (\d+)\)")


def readme_figure() -> tuple[float, float, int, float]:
    """(start, final, steps, noise) as the README states them."""
    text = (ROOT / "README.md").read_text()
    start, final, steps = SUMMARY.search(text).groups()
    noise = re.search(r"within about ±(\d\.\d+)", text)
    assert noise, "README: the default run's figure must state its noise ('within about ±x')"
    return float(start), float(final), int(steps), float(noise.group(1))


def test_readme_states_a_figure_and_its_noise():
    start, final, steps, noise = readme_figure()
    assert steps == 100 and 0 < start < final and 0 < noise < 0.2


@pytest.mark.slow
def test_default_run_prints_the_readme_figure(tmp_path):
    start, final, steps, noise = readme_figure()
    proc = subprocess.run(
        [sys.executable, "-m", "htpo_jax.train", "--set", f"trainer.output_dir={tmp_path / 'run'}",
         "trainer.progress_bar=false"],
        capture_output=True, text=True, timeout=2400, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = SUMMARY.search(proc.stdout)
    assert got, proc.stdout[-2000:]
    got_start, got_final, got_steps = float(got[1]), float(got[2]), int(got[3])
    assert got_steps == steps
    assert got_start == pytest.approx(start, abs=0.005)  # step 0: the shipped model, one seed
    assert abs(got_final - final) <= noise, (got_final, final, noise)
