"""Long-running reliability through the real parts: a learner process that dies (exit 137 at a
point the fault drill names, as a SIGKILL leaves it) is restarted from its newest checkpoint
and replays what it had not acknowledged; a job past its restarts fails with each cause; a
verifier that cannot score stops the job; SIGTERM checkpoints the current step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from procs import ROOT
from test_e2e import read_metrics, toy_config

pytestmark = pytest.mark.slow


def no_eval_data(tmp_path: Path) -> dict:
    return {"eval": None,
            "train": [json.loads(toy_config(tmp_path).datasets.train[0].model_dump_json())]}


def test_dead_learner_restarts_from_its_checkpoint_and_replays_unacknowledged_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The learner dies after SFT step 3 (checkpoint at step 2), and its replacement dies
    after its 6th GRPO step (checkpoint at step 4). Each restart resumes from the newest
    checkpoint; the GRPO groups trained since that checkpoint were never acknowledged, so
    the third learner reads them again from Redis: every ticket is trained exactly once in
    the final weights' lineage, and the stream keeps only the last checkpoint interval's groups."""
    from services.runner import JobRunner

    monkeypatch.setenv("NEBULA_FAULTS",
                       "learner.after_offline_step@3,learner-r1.after_step@6")
    cfg = toy_config(tmp_path, rollout={"engine": "hf"}, datasets=no_eval_data(tmp_path),
                     stages=[{"type": "sft", "steps": 4, "batch_size": 8, "lr": 0.001},
                             {"type": "grpo", "steps": 8}],
                     checkpoint={"dir": str(tmp_path / "ck"), "interval": 2, "keep": 3},
                     recovery={"backoff_s": 0})
    summary = JobRunner(cfg, job_id="phoenix").run()
    restarts = summary["learner_restarts"]
    assert [(r["stage"], r["resume_stage"], r["resume_step"]) for r in restarts] == \
        [(0, 0, 2), (1, 1, 4)]
    assert [Path(r["checkpoint"]).name for r in restarts] == ["sft0-step2", "grpo1-step4"]
    assert all("137" in r["cause"] or "died" in r["cause"].lower() for r in restarts)
    sft, grpo = summary["stages"]
    assert sft["steps"] == 4 and grpo["steps"] == 8
    assert grpo["tickets_trained"] == [[0, 8 * 4]] and grpo["tickets_trained_n"] == 8 * 4
    # steps 4 and 5 were trained by the dead learner after its last checkpoint: read again
    assert grpo["replayed"] >= 2 * 4
    # trimmed at each mid-stage checkpoint: the end keeps only the last interval's groups
    assert grpo["stream_pending_end"] == 0 and grpo["stream_entries_end"] == 2 * 4
    # the replacement's versions go on above the dead learner's (engines load them)
    assert restarts[1]["version"] > restarts[0]["version"]
    steps = [r["step"] for r in read_metrics(cfg) if r["stage"] == "grpo1"]
    assert steps[-1] > len(set(steps))  # global steps count the replayed ones again


def test_a_learner_that_keeps_dying_fails_the_job_with_each_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.runner import JobRunner

    monkeypatch.setenv("NEBULA_FAULTS",
                       "learner.after_offline_step@1,learner-r1.after_offline_step@1")
    cfg = toy_config(tmp_path, rollout={"engine": "hf"}, datasets=no_eval_data(tmp_path),
                     stages=[{"type": "sft", "steps": 3, "batch_size": 8, "lr": 0.001}],
                     recovery={"max_restarts": 1, "backoff_s": 0})
    with pytest.raises(RuntimeError, match=r"the learner died 2 times, more than "
                       r"recovery.max_restarts 1: #1 in stage 0: \w+.*; #2 in stage 0: \w+"):
        JobRunner(cfg, job_id="doomed").run()


def test_a_verifier_that_cannot_score_stops_the_job_and_never_trains_it(
        tmp_path: Path) -> None:
    """Every reference is an invalid regex: each sample comes back as a verifier error. The
    samples are left out of the loss (a no-verdict sample is not a wrong answer), counted in
    the step metrics, and after `verifier.error_window` steps over `max_error_rate` the job
    stops with the verifier and a sample reason named."""
    from services.runner import JobRunner

    src = toy_config(tmp_path).datasets.train[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**json.loads(line), "answer": "(("}) + "\n"
                           for line in Path(src.path).read_text().splitlines()[:200]))
    train = {**json.loads(src.model_dump_json()), "path": str(bad), "verifier": "regex"}
    cfg = toy_config(tmp_path, rollout={"engine": "hf"},
                     datasets={"eval": None, "train": [train]},
                     stages=[{"type": "grpo", "steps": 50}],
                     verifier={"error_window": 2, "max_error_rate": 0.5})
    with pytest.raises(Exception, match=r"verifier 'regex' could not score 32 of the 32 "
                       r"samples of the last 2 learner steps .*pattern is not a valid regex"):
        JobRunner(cfg, job_id="badverifier").run()
    rows = read_metrics(cfg)
    assert [r["verifier_errors"] for r in rows] == [16, 16]


def test_sigterm_checkpoints_the_current_step_and_resume_loses_nothing(tmp_path: Path) -> None:
    """`nebula run` gets SIGTERM once the learner has done 3 GRPO steps (the drill sends it
    from the driver at that point). The learner writes a checkpoint of the step it is at
    before the process exits; a resume from it starts exactly there."""
    cfg = toy_config(tmp_path, rollout={"engine": "hf"}, datasets=no_eval_data(tmp_path),
                     stages=[{"type": "sft", "steps": 2, "batch_size": 8, "lr": 0.001},
                             {"type": "grpo", "steps": 200}],
                     checkpoint={"dir": str(tmp_path / "ck"), "keep": 5})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(by_alias=True, mode="json")))
    env = {**os.environ, "NEBULA_FAULTS": "driver.sigterm_at_step@3"}
    proc = subprocess.run([sys.executable, "-m", "services", "run", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "preempted" in proc.stderr and "checkpointing the current step" in proc.stderr
    done = max(r["step"] for r in read_metrics(cfg) if r["stage"] == "grpo1") - 2  # sft: 2
    assert 3 <= done < 200
    ck = tmp_path / "ck" / f"grpo1-step{done}"
    assert ck.is_dir(), sorted(p.name for p in (tmp_path / "ck").iterdir())

    from services.runner import JobRunner

    resumed = cfg.model_copy(update={"resume_from": str(ck), "output_dir": str(tmp_path / "r2")})
    resumed.stages[1].steps = done + 2
    second = JobRunner(resumed, job_id="resumed").run()
    assert second["resumed_from"]["step"] == done  # zero steps lost
    assert second["stages"][0]["tickets_trained"] == [[0, (done + 2) * 4]]
