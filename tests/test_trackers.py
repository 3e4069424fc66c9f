"""Experiment trackers (nebula.trackers): real W&B in offline mode (a local run dir) and
real MLflow on a local `file:` store, fed through MetricsSink, get the TensorBoard scalars
under TensorBoard's names; a missing package fails with an error naming the setting and
the extra."""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nebula import trackers as tracking
from nebula.trackers import TrackerUnavailable, flatten, mlflow_name, open_trackers

RUN = "j0123456789abcdef"


def _job(out: Path, logging_cfg: dict[str, Any] | None = None) -> Any:
    from nebula.config.job import JobConfig

    return JobConfig.model_validate({
        "name": "trk", "output_dir": str(out), "model": {"path": str(out / "model")},
        "datasets": {"train": [{"path": str(out / "train.jsonl"), "verifier": "exact"}]},
        "stages": [{"type": "sft", "steps": 2, "batch_size": 2}, {"type": "grpo", "steps": 3}],
        "cluster": {"redis_url": "redis://:pw@localhost:6379/0"},
        "logging": logging_cfg or {}})


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network, nothing outside tmp_path: W&B offline with its dirs here, MLflow
    without telemetry; MLFLOW_ALLOW_FILE_STORE unset (the tracker sets it) and restored."""
    home = tmp_path / "home"
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics sampling
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so restored after
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "out"


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf Records of a .wandb file (W&B's leveldb-log format: a 7-byte header,
    then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # full / last chunk
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
             for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def _tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def _wandb_core_children() -> list[Any]:
    import psutil

    try:
        return [p for p in psutil.Process().children(recursive=True)
                if "wandb" in p.name()]
    except psutil.Error:
        return []


ROWS = [(1, "sft0", {"loss": 2.5, "lr": 1e-4, "done": False, "note": "x"}),
        (2, "sft0", {"loss": 2.0, "lr": 1e-4}),
        (3, "grpo1", {"loss": 0.75, "reward": 0.25, "tokens": 120}),
        (4, "grpo1", {"loss": 0.5, "reward": 0.5, "tokens": 130})]
EVAL = (3, {"eval/greedy": 0.5, "eval/pass@4": 0.75, "eval/domain/math/mean@4": 0.5})


def test_metrics_sink_feeds_wandb_offline_and_mlflow_file_store(offline: Path) -> None:
    from mlflow.tracking import MlflowClient

    from learner.metrics import MetricsSink

    cfg = _job(offline, {"wandb": {"project": "nebula-test", "mode": "offline"},
                         "mlflow": {"experiment": "nebula-test"}})
    trackers = open_trackers(cfg, RUN)
    assert [type(t).__name__ for t in trackers] == ["WandbTracker", "MlflowTracker"]
    sink = MetricsSink(offline, trackers=trackers)
    for step, stage, values in ROWS:
        sink.log(step, stage, values)
    sink.log_eval(*EVAL)
    sink.close()
    assert sink.trackers == []

    # What TensorBoard got: the names and values every tracker must carry.
    tb = _tb_scalars(offline / "tensorboard")
    assert set(tb) == {"sft0/loss", "sft0/lr", "grpo1/loss", "grpo1/reward", "grpo1/tokens"}
    expected = {tag: [(s, pytest.approx(v)) for s, v in pts] for tag, pts in tb.items()}
    expected.update({tag: [(EVAL[0], v)] for tag, v in EVAL[1].items()})

    # W&B: an offline run dir under output_dir (the default dir), id = the run name.
    run_dirs = list((offline / "wandb").glob(f"offline-run-*-{RUN}"))
    assert len(run_dirs) == 1, list((offline / "wandb").iterdir())
    records = _wandb_records(run_dirs[0] / f"run-{RUN}.wandb")
    got: dict[str, list[tuple[int, float]]] = {}
    for row in _wandb_history(records):
        for k, v in row.items():
            if k != "step" and not k.startswith("_"):
                got.setdefault(k, []).append((row["step"], v))
    assert got == expected
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == RUN and run.project == "nebula-test"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["stages.1.type"] == "grpo"
    assert config["output_dir"] == str(offline)
    assert config["cluster.redis_url"] == "redis://:***@localhost:6379/0"  # no password

    # MLflow: the default file store under output_dir, run name = the run name.
    uri = (offline.absolute() / "mlruns").as_uri()
    assert (offline / "mlruns").is_dir()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nebula-test")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == RUN and mrun.info.status == "FINISHED"
    assert mrun.data.params["stages.1.type"] == "grpo"
    assert mrun.data.params["cluster.redis_url"] == "redis://:***@localhost:6379/0"
    for tag, pts in expected.items():
        hist = client.get_metric_history(mrun.info.run_id, mlflow_name(tag))
        assert [(m.step, m.value) for m in hist] == pts, tag
    assert mlflow_name("eval/pass@4") == "eval/pass_at_4"
    assert {m.key for m in client.get_metric_history(mrun.info.run_id, "grpo1/loss")} \
        == {"grpo1/loss"}

    # wandb's service process went with its last run.
    deadline = time.monotonic() + 10
    while _wandb_core_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _wandb_core_children() == []


def test_mlflow_run_resumed_by_name(offline: Path) -> None:
    """A restarted learner opens the same MLflow run (params kept, metrics appended)."""
    from mlflow.tracking import MlflowClient

    cfg = _job(offline, {"mlflow": {"tracking_uri": str(offline / "store")}})
    (first,) = open_trackers(cfg, RUN)
    first.log(1, {"grpo1/loss": 1.0})  # then the learner dies: no close
    (again,) = open_trackers(cfg, RUN)
    assert again.run_id == first.run_id
    again.log(2, {"grpo1/loss": 0.5})
    again.close()
    hist = MlflowClient(again.tracking_uri).get_metric_history(again.run_id, "grpo1/loss")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 0.5)]


@pytest.mark.parametrize("module,setting,package", [
    ("wandb", "logging.wandb", "wandb"), ("mlflow", "logging.mlflow", "mlflow-skinny")])
def test_missing_package_names_the_setting_and_extra(
        offline: Path, monkeypatch: pytest.MonkeyPatch, module: str, setting: str,
        package: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    cfg = _job(offline, {"wandb": {"mode": "offline"}, "mlflow": {}})
    with pytest.raises(TrackerUnavailable) as err:
        open_trackers(cfg, RUN)
    msg = str(err.value)
    assert setting in msg and "nebula-rl[trackers]" in msg and package in msg
    assert isinstance(err.value, ImportError)
    # Checked before any tracker starts: no half-opened W&B run.
    assert not (offline / "wandb").exists() and not (offline / "mlruns").exists()


def test_no_trackers_without_config(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert open_trackers(_job(offline), RUN) == []  # nothing imported
    assert open_trackers(_job(offline, {"wandb": {"mode": "disabled"}}), RUN) == []


def test_a_failing_tracker_does_not_stop_the_sink(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from learner.metrics import MetricsSink

    class Broken:
        closed = False

        def log(self, step: int, metrics: Any) -> None:
            raise RuntimeError("tracker server down")

        def close(self) -> None:
            Broken.closed = True
            raise RuntimeError("still down")

    class Keep:
        def __init__(self) -> None:
            self.rows: list[tuple[int, dict[str, float]]] = []

        def log(self, step: int, metrics: Any) -> None:
            self.rows.append((step, dict(metrics)))

        def close(self) -> None:
            pass

    keep = Keep()
    sink = MetricsSink(tmp_path, trackers=[Broken(), keep])
    with caplog.at_level(logging.WARNING, logger="nebula.trackers"):
        sink.log(1, "grpo1", {"loss": 1.5, "ok": True, "tag": "a"})
        sink.log(2, "grpo1", {"loss": 1.0})
        sink.log_eval(2, {"eval/greedy": 0.5})
        sink.close()
    assert keep.rows == [(1, {"grpo1/loss": 1.5}), (2, {"grpo1/loss": 1.0}),
                         (2, {"eval/greedy": 0.5})]
    assert Broken.closed
    assert "tracker server down" in caplog.text and "Broken.close failed" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_names_and_flattening() -> None:
    assert mlflow_name("grpo1/loss") == "grpo1/loss"
    assert mlflow_name("eval/domain/a+b/mean@4") == "eval/domain/a_b/mean_at_4"
    assert mlflow_name("eval//x/../y/") == "eval/x/__/y"
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "s": [{"t": "x"}], "e": {}, "n": None}) \
        == {"a.b": 1, "a.c": "[1, 2]", "s.0.t": "x", "e": "{}", "n": None}
    assert tracking.redact("cluster.redis_url", "redis://:s3cret@h:6379/0") \
        == "redis://:***@h:6379/0"
    assert tracking.redact("cluster.redis_url", "redis://h:6379") == "redis://h:6379"
    assert tracking.redact("x.api_key", "abc") == "***"
    assert tracking.redact("rollout.max_tokens", 16) == 16
