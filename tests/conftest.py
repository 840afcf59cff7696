"""Fixtures shared by the test modules, and the rule that keeps tests/multidevice on its own.

tests/multidevice runs on 8 fake CPU devices in one process: its conftest sets
`jax_num_cpu_devices` when pytest imports it, before any test initialises jax's backend. The
device count is per process, so that folder is its own pytest invocation
(`python -m pytest -q tests/multidevice`): any invocation that does not name only paths in it
skips it, and one that names it together with other tests is refused, so every other test keeps
jax's one CPU device. Helper functions shared between modules are in helpers.py and
tiny_models.py; no test module imports another."""

from pathlib import Path

import pytest
from tiny_models import left_padded_batch, random_decoder, small_qwen3

MULTIDEVICE = Path(__file__).resolve().parent / "multidevice"


def _in_multidevice(config, arg: str) -> bool:
    path = (Path(config.invocation_params.dir) / arg.split("::")[0]).resolve()
    return path == MULTIDEVICE or MULTIDEVICE in path.parents


def _multidevice_run(config) -> bool:
    """Whether this invocation names tests/multidevice (or paths in it) and nothing else."""
    inside = [_in_multidevice(config, a) for a in config.args]
    return bool(inside) and all(inside)


def pytest_configure(config):
    inside = [_in_multidevice(config, a) for a in config.args]
    if any(inside) and not all(inside):
        raise pytest.UsageError(
            "tests/multidevice runs on 8 fake CPU devices in a pytest invocation of its own: "
            "python -m pytest -q tests/multidevice"
        )


def pytest_report_header(config):
    if not _multidevice_run(config):
        return "tests/multidevice: not in this run (python -m pytest -q tests/multidevice)"
    return None


def pytest_ignore_collect(collection_path, config):
    if collection_path == MULTIDEVICE and not _multidevice_run(config):
        return True
    return None


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    """A random 2-layer Qwen3-style model, the arithmetic tokenizer and a little task data."""
    from transformers import AutoTokenizer

    from htpo_jax.models.hf_io import save_pretrained
    from htpo_jax.tasks.arith import write_task_data, write_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    tok = write_tokenizer(model_dir)
    vocab = len(AutoTokenizer.from_pretrained(str(tok)))
    save_pretrained(small_qwen3(vocab), model_dir)
    write_task_data(root / "data", n_train=64, n_val=8, seed=0, max_ops=1)
    return root


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The arithmetic task's tokenizer, written to a fresh folder."""
    from htpo_jax.tasks import arith

    return arith.write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    """A random Qwen3-style decoder (tiny_models.random_decoder, untied, seed 0)."""
    return random_decoder("qwen3", False)


@pytest.fixture(scope="module")
def prompts():
    """3 prompts of 10 columns, rows 0 and 1 left padded (real lengths 5, 9, 10)."""
    ids, mask = left_padded_batch(0, b=3, t=10)
    return ids, mask
