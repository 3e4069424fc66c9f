"""The console of `nebula run` is for people: a short toy job's captured output has the plan,
stage progress, eval tables and the summary table, and no engine, Ray or DeepSpeed log line
(those are in OUTPUT_DIR/logs/<actor>.log). The same job logs to MLflow (a local `file:`
store): the learner's per-step rows and the eval rows, as in TensorBoard."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from procs import ROOT
from test_e2e import toy_config

pytestmark = pytest.mark.slow

# What engine/framework output looks like on a console: Ray's actor prefixes and its own
# components, vLLM's and torch's log records, progress bars of weight loading.
ENGINE_LINE = re.compile(r"\((RolloutWorker|LearnerWorker|EngineCore|raylet|pid=)|"
                         r"INFO \d\d-\d\d|WARNING \d\d-\d\d|\[W\d{4}|Loading safetensors|"
                         r"\[DeepSpeed\]|\[INFO\]|Triton|it/s\]")


def test_run_console_shows_progress_and_results_only(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = toy_config(tmp_path, stages=[{"type": "sft", "steps": 4, "batch_size": 16,
                                        "lr": 0.003}, {"type": "grpo", "steps": 2}],
                     logging={"mlflow": {"experiment": "console"}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(by_alias=True, mode="json")))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "-m", "services", "run", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    noisy = [line for line in out.splitlines() if ENGINE_LINE.search(line)]
    assert not noisy, noisy[:20]
    for expected in ("job toy-addition", "stage 0", "sft, 4 steps", "grpo1", "eval before "
                     "stage 1", "greedy", "pass@1", "done in", "held-out accuracy"):
        assert expected in out, (expected, out[-3000:])
    assert len(out.splitlines()) < 80, out
    logs = Path(cfg.output_dir) / "logs"
    rollout_log = (logs / "rollout-0.log").read_text()
    assert "vllm" in rollout_log.lower() or "EngineCore" in rollout_log
    assert (logs / "learner.log").exists()

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the tracker does

    client = MlflowClient(f"file:{Path(cfg.output_dir).resolve()}/mlruns")
    exp = client.get_experiment_by_name("console")
    (run,) = client.search_runs([exp.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "sft0/loss")] == \
        [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "grpo1/reward_mean")) == 2
    assert len(client.get_metric_history(run.info.run_id, "eval/greedy")) == 2
