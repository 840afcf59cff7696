"""Config: paper defaults, YAML + overrides, one-line errors naming the key, exit status 2."""

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from htpo_jax.run.config import (
    Config,
    ConfigError,
    all_keys,
    cli_config,
    config_from_dict,
    config_markdown,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_paper_defaults():
    c = load_config()
    assert c.optim.learning_rate == 1e-6 and c.optim.warmup_steps == 10
    assert c.optim.weight_decay == 0.1 and c.optim.grad_clip == 1.0
    assert c.optim.mini_batch_size == 32 and c.optim.ppo_epochs == 1
    assert c.rollout.n == 16 and c.rollout.max_response_length == 20480
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, -1)
    a = c.algorithm
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert a.difficulty_threshold == 0.6 and a.high_entropy_ratio == 0.2
    assert (a.drop_low_entropy_ratio, a.drop_high_entropy_ratio) == (0.006, 0.02)
    assert a.loss == "htpo" and a.loss_agg_mode == "token-mean"
    assert a.overlong_buffer_enable and a.overlong_buffer_len == 4096
    assert a.overlong_penalty_factor == 1.0
    assert a.dynamic_sampling and a.dynamic_sampling_metric == "acc"
    assert a.max_num_gen_batches == 10
    assert not a.use_kl_loss and a.kl_coef == 0.001
    assert c.data.max_prompt_length == 2048
    assert (c.data.train_batch_size, c.data.gen_batch_size) == (128, 256)
    for key in [
        "trainer.output_dir",
        "trainer.total_steps",
        "trainer.seed",
        "trainer.val_every",
        "checkpoint.save_every",
        "checkpoint.max_to_keep",
        "mesh.data",
        "mesh.fsdp",
        "mesh.tensor",
        "model.path",
        "model.remat",
        "data.train_files",
        "data.val_files",
        "trainer.loggers",
        "trainer.wandb_project",
        "trainer.progress_bar",
        "optim.micro_batch_size",
    ]:
        assert key in all_keys()


def test_frozen():
    c = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.optim.learning_rate = 1.0


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(
        "model:\n  path: /m\n"
        "optim:\n  learning_rate: 3e-6\n  mini_batch_size: 16\n"
        "data:\n  train_files: [a.parquet, b.jsonl]\n"
        "trainer:\n  loggers: [jsonl, tensorboard]\n"
    )
    c = load_config(
        p,
        [
            "optim.learning_rate=2e-6",  # the last word wins
            "rollout.n=8",
            "algorithm.loss=dapo",
            "data.val_files=aime.parquet",  # a single string means a list of one
            "trainer.progress_bar=false",
            "mesh={data: 2, fsdp: 4}",
        ],
    )
    assert c.model.path == "/m"
    assert c.optim.learning_rate == 2e-6 and isinstance(c.optim.learning_rate, float)
    assert c.optim.mini_batch_size == 16
    # relative paths: against the config file's directory; from --set, the working directory
    assert c.data.train_files == (str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl"))
    assert c.data.val_files == (str(Path.cwd() / "aime.parquet"),)
    assert c.trainer.loggers == ("jsonl", "tensorboard")
    assert c.rollout.n == 8 and c.algorithm.loss == "dapo"
    assert c.trainer.progress_bar is False
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (2, 4, 1)


def test_int_given_for_float_and_yaml_exponent():
    c = load_config(overrides=["algorithm.clip_ratio_c=3", "optim.learning_rate=1e-5"])
    assert c.algorithm.clip_ratio_c == 3.0 and type(c.algorithm.clip_ratio_c) is float
    assert c.optim.learning_rate == 1e-5


def test_to_dict_round_trip():
    c = load_config(overrides=["data.train_files=[/d/x.parquet]", "trainer.seed=7"])
    d = c.to_dict()
    assert d["data"]["train_files"] == ["/d/x.parquet"]
    assert set(d) == {
        "model",
        "data",
        "rollout",
        "algorithm",
        "optim",
        "trainer",
        "checkpoint",
        "mesh",
        "distributed",
    }
    assert config_from_dict(json.loads(json.dumps(d))) == c


def test_checkpoint_dir_default():
    c = load_config(overrides=["trainer.output_dir=/tmp/run"])
    assert c.checkpoint_dir == "/tmp/run/checkpoints"
    assert load_config(overrides=["checkpoint.dir=/ck"]).checkpoint_dir == "/ck"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algorithm.loss=ppo", "algorithm.loss: 'ppo' is not allowed; allowed: htpo, dapo, grpo"),
        ("optim.learning_rat=1e-6", "did you mean 'optim.learning_rate'"),
        ("optim.lr=1e-6", "did you mean 'optim.learning_rate'"),
        ("optm.learning_rate=1", "did you mean 'optim.learning_rate'"),
        ("trainer.save_every=5", "did you mean 'checkpoint.save_every'"),
        ("optim.learning_rate=fast", "optim.learning_rate: expected a number, got 'fast'"),
        ("optim.learning_rate=-1", "optim.learning_rate: must be > 0"),
        ("trainer.total_steps=2.5", "trainer.total_steps: expected an integer"),
        ("trainer.progress_bar=maybe", "trainer.progress_bar: expected true or false"),
        ("trainer.loggers=[jsonl, mlflow]", "trainer.loggers: 'mlflow' is not allowed"),
        ("trainer.loggers=[wandb]", "trainer.loggers: must include jsonl"),
        ("trainer.loggers=[jsonl, wandb, jsonl]", "trainer.loggers: duplicate entries"),
        ("model.dtype=float16", "model.dtype: 'float16' is not allowed; allowed: bfloat16"),
        ("mesh.tensor=0", "mesh.tensor: must be -1 (the rest) or >= 1"),
        ("mesh.data=-1", "mesh: at most one axis may be -1"),
        ("optim.mini_batch_size=48", "optim.mini_batch_size: must divide data.train_batch_size"),
        ("optim.micro_batch_size=7", "optim.micro_batch_size: must divide"),
        ("algorithm.overlong_buffer_len=30000", "algorithm.overlong_buffer_len: must be <"),
        ("nosuchthing", "not of the form section.key=value"),
        # the loss's own bounds (loss.LOSS_BOUNDS), not looser ones of the config's
        ("algorithm.clip_ratio_c=0.5", "algorithm.clip_ratio_c: must be > 1, got 0.5"),
        ("algorithm.clip_ratio_low=1", "algorithm.clip_ratio_low: must be in [0, 1), got 1.0"),
        ("algorithm.high_entropy_ratio=2", "algorithm.high_entropy_ratio: must be in [0, 1]"),
        ("algorithm.loss_agg_mode=sum", "algorithm.loss_agg_mode: 'sum' is not allowed"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_loss_keys_use_the_loss_bounds():
    """One validator per hyperparameter: every LossConfig field is an `algorithm` key checked by
    the very entry LossConfig itself uses, so a value the config accepts never makes
    LossConfig raise later (the old config allowed clip_ratio_c=0.5, LossConfig did not)."""
    from htpo_jax.rl.loss import AGG_MODES, LOSS_BOUNDS, LossConfig
    from htpo_jax.run.config import AlgorithmConfig

    algo = {f.name: f for f in dataclasses.fields(AlgorithmConfig)}
    loss_fields = [f.name for f in dataclasses.fields(LossConfig)]
    # max_response_length is not an algorithm key: StepConfig sets it from the rollout section.
    assert set(LOSS_BOUNDS) == set(loss_fields) - {"loss_agg_mode", "max_response_length"}
    for name in LOSS_BOUNDS:
        assert algo[name].metadata["check"] is LOSS_BOUNDS[name], name
    assert typing.get_args(typing.get_type_hints(AlgorithmConfig)["loss_agg_mode"]) == AGG_MODES
    # Accepted values build a LossConfig; the edges of each range agree on both sides.
    for override in [
        "algorithm.clip_ratio_low=0",
        "algorithm.clip_ratio_high=0",
        "algorithm.clip_ratio_c=1.0001",
        "algorithm.drop_high_entropy_ratio=1",
    ]:
        a = load_config(overrides=[override]).algorithm
        LossConfig(**{n: getattr(a, n) for n in loss_fields if n != "max_response_length"})
    with pytest.raises(ValueError, match="LossConfig.clip_ratio_c must be > 1"):
        LossConfig(clip_ratio_c=1.0)


def test_trainer_bad_loss_bound_exits_2_with_one_line(capsys):
    """The README's promise for `python -m htpo_jax.train --set algorithm.clip_ratio_c=0.5`."""
    from htpo_jax.run.train import main

    with pytest.raises(SystemExit) as e:
        main(["--set", "algorithm.clip_ratio_c=0.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "config error: algorithm.clip_ratio_c: must be > 1, got 0.5\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_file_merges_sections_key_by_key(tmp_path):
    _write(
        tmp_path / "base" / "paper.yaml",
        "model:\n  path: models/m\n  remat: false\n"
        "optim:\n  learning_rate: 2e-6\n  mini_batch_size: 16\n"
        "trainer:\n  output_dir: runs/paper\n",
    )
    child = _write(
        tmp_path / "exp" / "child.yaml",
        "base: ../base/paper.yaml\n"
        "optim:\n  learning_rate: 5e-6\n"  # one key of a section: the others stay the base's
        "algorithm:\n  loss: dapo\n"
        "data:\n  train_files: [d.jsonl]\n",
    )
    c = load_config(child, ["optim.warmup_steps=3"])
    assert c.optim.learning_rate == 5e-6 and c.optim.mini_batch_size == 16
    assert c.optim.warmup_steps == 3 and c.model.remat is False
    assert c.algorithm.loss == "dapo"
    # relative paths: against the directory of the file that wrote them
    assert c.model.path == str(tmp_path / "base" / "models" / "m")
    assert c.trainer.output_dir == str(tmp_path / "base" / "runs" / "paper")
    assert c.data.train_files == (str(tmp_path / "exp" / "d.jsonl"),)
    # a chain of bases: grandchild over child over paper
    grand = _write(tmp_path / "g.yaml", "base: exp/child.yaml\noptim:\n  mini_batch_size: 8\n")
    g = load_config(grand)
    assert (g.optim.learning_rate, g.optim.mini_batch_size, g.algorithm.loss) == (5e-6, 8, "dapo")


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"a.yaml": "base: nope.yaml\n"}, "a.yaml: base file not found: .*nope.yaml"),
        (
            {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"},
            "a.yaml -> .*b.yaml -> .*a.yaml",
        ),
        ({"a.yaml": "base: a.yaml\n"}, "base files form a cycle"),
        ({"a.yaml": "base: [b.yaml]\n"}, "a.yaml: base: expected a YAML file name"),
        # a problem in the base file names that file and the key
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "optim:\n  lr: 1\n"}, "b.yaml: unknown .*optim.lr"),
    ],
)
def test_base_file_errors_are_one_line(tmp_path, files, expected):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(e.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  learning_rate: 1e-6\n  warmup: 5\n")
    with pytest.raises(ConfigError, match="'optim.warmup' .*did you mean 'optim.warmup_steps'"):
        load_config(p)
    p.write_text("optimizer:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config section 'optimizer'.*'optim'"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_config_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli_config(["--set", "algorithm.loss=nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "algorithm.loss" in err
    assert isinstance(cli_config(["--set", "rollout.n=4"]), Config)


def test_subprocess_exit_status_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "htpo_jax.config", "--set", "optim.learning_rat=1e-6"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.learning_rate" in lines[0]


def test_docs_config_md_is_current():
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert doc == config_markdown(), "regenerate: python -m htpo_jax.config --markdown"
    for key in all_keys():
        assert f"`{key}`" in doc


# ---------------------------------------------------------------- issue 20 item 8: YAML input
def test_duplicate_yaml_key_is_refused_naming_key_and_file(tmp_path):
    """Before: the second `learning_rate` silently replaced the first."""
    p = tmp_path / "dup.yaml"
    p.write_text("optim:\n  learning_rate: 1e-6\n  warmup_steps: 0\n  learning_rate: 3e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "duplicate key 'learning_rate'" in msg, msg
    assert "line 4" in msg, msg
    p.write_text("optim: {}\noptim:\n  learning_rate: 1e-6\n")  # a whole section twice
    with pytest.raises(ConfigError, match="duplicate key 'optim'"):
        load_config(p)
    with pytest.raises(ConfigError, match="duplicate key 'learning_rate'"):
        load_config(None, ["optim={learning_rate: 1, learning_rate: 2}"])
    # YAML merge keys (<<) are not duplicates: the mapping's own key wins, as YAML says
    p.write_text("optim:\n  <<: {learning_rate: 1.0e-6}\n  learning_rate: 2.0e-6\n")
    assert load_config(p).optim.learning_rate == 2e-6


def test_non_utf8_yaml_is_one_line(tmp_path):
    """Before: a UnicodeDecodeError traceback from Path.read_text."""
    p = tmp_path / "latin1.yaml"
    p.write_bytes("trainer:\n  output_dir: r\u00e9sultats\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "UTF-8" in msg, msg


def test_old_logger_key_still_reads_as_loggers(tmp_path):
    """trainer.logger was renamed trainer.loggers: old configs, old --set lines and old bases
    keep loading; a file giving both names is one line naming the new key."""
    old = tmp_path / "old.yaml"
    old.write_text("trainer:\n  logger: [jsonl, tensorboard]\n")
    assert load_config(old).trainer.loggers == ("jsonl", "tensorboard")
    c = load_config(old, ["trainer.logger=[jsonl, wandb]"])
    assert c.trainer.loggers == ("jsonl", "wandb")
    c = load_config(old, ["trainer.loggers=[jsonl]"])  # the new name overrides the old one
    assert c.trainer.loggers == ("jsonl",)
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {old.name}\ntrainer:\n  loggers: [jsonl]\n")
    assert load_config(child).trainer.loggers == ("jsonl",)
    both = tmp_path / "both.yaml"
    both.write_text("trainer:\n  logger: [jsonl]\n  loggers: [jsonl]\n")
    with pytest.raises(ConfigError, match="trainer.logger was renamed to trainer.loggers"):
        load_config(both)
