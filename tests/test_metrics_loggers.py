"""trainer.loggers: TensorBoard events and the W&B run hold what metrics.jsonl holds, read back
from the files they wrote (W&B offline); a resumed run continues the same W&B run; only
process 0 logs; a missing wandb package stops the launch with one line."""

import glob
import json
import math
import struct
from pathlib import Path

import pytest

from htpo_jax.run import metrics as metrics_mod
from htpo_jax.run.config import load_config
from htpo_jax.run.metrics import MetricsLogger, WandbOptions, read_metrics
from htpo_jax.run.preflight import LaunchError, prelaunch

ROOT = Path(__file__).resolve().parent.parent
RECORDS = [  # step -> metrics, with a NaN (null in metrics.jsonl, left out of the trackers)
    (0, {"val/accuracy": 0.25}),
    (1, {"train/loss": 0.125, "train/reward_mean": -0.5, "train/ppo_kl": float("nan")}),
    (2, {"train/loss": -0.0625, "train/reward_mean": 0.1, "val/accuracy": 0.375}),
    (3, {"train/loss": 0.03125, "train/reward_mean": 0.3}),
    (4, {"train/loss": 0.2, "train/reward_mean": 0.45}),
]


def jsonl_values(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: {key: value}}, nulls left out."""
    return {
        r["step"]: {k: v for k, v in r.items() if k != "step" and v is not None}
        for r in read_metrics(out / "metrics.jsonl")
    }


def tensorboard_scalars(directory: Path) -> dict[int, dict[str, float]]:
    """Every scalar of every event file in `directory` (TFRecord framing: length, its crc,
    the Event proto, its crc), as {step: {tag: value}}."""
    from tensorboardX.proto import event_pb2

    out: dict[int, dict[str, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(event.step, {})[v.tag] = v.simple_value
    return out


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: a 7-byte header, then a LevelDB-style log of
    32 KiB blocks, each chunk with a 7-byte header (crc, length, type: 1 full, 2 first,
    3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(buf)
            buf = b""


def wandb_runs(out: Path) -> list[dict]:
    """Each offline run under `<out>/wandb`, oldest first: id, project, name, tags, config and
    history ({step: {key: value}}, W&B's own `_` keys left out)."""
    runs = []
    for path in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))):
        run = {"history": {}, "config": {}}
        for r in wandb_records(Path(path)):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, project=r.run.project, name=r.run.display_name)
                run["tags"] = list(r.run.tags)
                run["config"].update({c.key: json.loads(c.value_json) for c in r.run.config.update})
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                step = items.pop("_step")
                row = run["history"].setdefault(step, {})
                row.update({k: v for k, v in items.items() if not k.startswith("_")})
        runs.append(run)
    return runs


def assert_same(got: dict, want: dict, rel: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for step, values in want.items():
        assert sorted(got[step]) == sorted(values), step
        for k, v in values.items():
            assert got[step][k] == pytest.approx(v, rel=rel, abs=0), (step, k)


def test_tensorboard_events_equal_metrics_jsonl(tmp_path):
    pytest.importorskip(
        "tensorboardX", reason="the tensorboard extra: pip install -e '.[tensorboard]'"
    )
    logger = MetricsLogger(tmp_path, loggers=("jsonl", "tensorboard"))
    for step, m in RECORDS[:3]:
        logger.log(step, m)
    logger.close()
    # a resume from step 1 drops step 2 from metrics.jsonl; TensorBoard appends a new event
    # file, in which the re-run step 2 is written again (a reader takes the latest)
    logger = MetricsLogger(tmp_path, resume_step=1, loggers=("jsonl", "tensorboard"))
    for step, m in RECORDS[2:]:
        logger.log(step, m)
    logger.close()
    want = jsonl_values(tmp_path)
    assert sorted(want) == [0, 1, 2, 3, 4] and "train/ppo_kl" not in want[1]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # event files hold float32 scalars
    assert_same(tensorboard_scalars(tmp_path / "tensorboard"), want, rel=1e-7)


@pytest.fixture
def offline_wandb(monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra: pip install -e '.[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_run_equals_metrics_jsonl_and_a_resume_continues_it(tmp_path, offline_wandb):
    opts = WandbOptions(
        project="htpo-test",
        name="run-a",
        run_id="20261206-000000-0123abcd",
        tags=("unit", "offline"),
        config={"trainer": {"total_steps": 4}, "algorithm": {"loss": "htpo"}},
    )
    logger = MetricsLogger(tmp_path, loggers=("jsonl", "wandb"), wandb=opts)
    for step, m in RECORDS[:3]:
        logger.log(step, m)
    logger.close()
    logger = MetricsLogger(tmp_path, resume_step=2, loggers=("jsonl", "wandb"), wandb=opts)
    for step, m in RECORDS[3:]:
        logger.log(step, m)
    logger.close()
    first, second = wandb_runs(tmp_path)
    for run in (first, second):  # the same W&B run, continued
        assert run["id"] == opts.run_id and run["project"] == "htpo-test"
        assert run["name"] == "run-a" and run["tags"] == ["unit", "offline"]
        assert run["config"]["trainer"] == {"total_steps": 4}
    assert sorted(first["history"]) == [0, 1, 2] and sorted(second["history"]) == [3, 4]
    history = {**first["history"], **second["history"]}
    assert_same(history, jsonl_values(tmp_path))  # JSON floats: exact


def test_only_process_0_logs(tmp_path, offline_wandb, monkeypatch):
    monkeypatch.setattr(metrics_mod, "is_main_process", lambda: False)
    opts = WandbOptions(project="p", name="n", run_id="not-process-0")
    logger = MetricsLogger(tmp_path, loggers=("jsonl", "tensorboard", "wandb"), wandb=opts)
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_missing_wandb_stops_the_launch_with_one_line(monkeypatch):
    import importlib.util

    cfg = load_config(ROOT / "configs" / "default.yaml", ["trainer.loggers=[jsonl,wandb]"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else find_spec(name, *a),
    )
    with pytest.raises(LaunchError, match=r"trainer.loggers has 'wandb' but the wandb package"):
        prelaunch(cfg)


@pytest.mark.slow
def test_default_run_with_wandb_resumes_the_same_run(tmp_path, offline_wandb):
    """The issue's acceptance run: `python -m htpo_jax.train --set trainer.loggers=[jsonl,wandb]`
    offline, 2 steps, then resumed to 3: one W&B run id, its history equal to metrics.jsonl."""
    from htpo_jax.run.train import main

    sets = [
        "--set",
        "trainer.loggers=[jsonl,wandb]",
        f"trainer.output_dir={tmp_path}",
        "trainer.progress_bar=false",
        "trainer.val_every=0",
        "trainer.val_before_train=false",
        "data.val_files=[]",
        "checkpoint.save_every=2",
        "optim.warmup_steps=1",
    ]
    main([*sets, "trainer.total_steps=2"])
    main([*sets, "trainer.total_steps=3"])
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    assert runs[0]["name"] == tmp_path.name and runs[0]["project"] == "htpo_jax"
    assert runs[1]["config"]["trainer"]["total_steps"] == 3
    assert sorted(runs[0]["history"]) == [1, 2] and sorted(runs[1]["history"]) == [3]
    history = {**runs[0]["history"], **runs[1]["history"]}
    want = jsonl_values(tmp_path)
    assert not any(math.isnan(v) for row in want.values() for v in row.values())
    assert_same(history, want)
