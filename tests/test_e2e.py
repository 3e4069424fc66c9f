"""End to end through the real parts: local Ray, embedded Redis, the verifier service,
vLLM-CPU rollout and the DeepSpeed-CPU learner (a short toy run)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from nebula.config import load_model
from nebula.config.job import JobConfig
from nebula.tasks.synthetic import make_split
from procs import ROOT

pytestmark = pytest.mark.slow


def toy_config(tmp: Path, **over: Any) -> JobConfig:
    data = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
    train, held = make_split("addition", tmp / "data", eval_size=100)
    data["output_dir"] = str(tmp / "run")
    data["model"]["path"] = str(tmp / "model")
    data["datasets"]["train"][0]["path"] = str(train)
    data["datasets"]["eval"]["path"] = str(held)
    data["datasets"]["eval"]["limit"] = 40
    data["stages"] = [{"type": "sft", "steps": 20, "batch_size": 32, "lr": 0.003},
                      {"type": "grpo", "steps": 4}]
    data["rollout"].update(prompts_per_request=4, samples_per_prompt=4)
    data["learner"].update(groups_per_step=4)
    data["async"] = {"max_staleness": 1}
    data["eval"] = {"max_prompts": 40}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return load_model(JobConfig, data)


def read_metrics(cfg: JobConfig) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").open()]


def test_toy_job_end_to_end_vllm(tmp_path: Path) -> None:
    from services.runner import JobRunner

    cfg = toy_config(tmp_path)
    summary = JobRunner(cfg, job_id="e2e").run()

    assert [s["stage"] for s in summary["stages"]] == ["sft0", "grpo1"]
    grpo = summary["stages"][1]
    assert set(grpo["staleness_hist"]) <= {"0", "1"}  # pacing kept staleness <= 1
    assert grpo["rollout"][0]["groups"] == 4 * 4 and grpo["samples"] == 4 * 4 * 4
    assert [e["when"] for e in summary["evals"]] == ["before stage 1 (grpo)",
                                                     "after stage 1 (grpo)"]
    # One optimizer step per learner step with a non-uniform group (uniform groups carry no
    # advantage and are skipped), and the eval after the stage ran on the final weights.
    assert summary["evals"][0]["version"] <= summary["evals"][1]["version"] <= \
        summary["evals"][0]["version"] + 4
    assert summary["evals"][1]["version"] == grpo["final_version"]
    rows = read_metrics(cfg)
    sft = [r for r in rows if r["stage"] == "sft0"]
    assert len(sft) == 20 and sft[-1]["loss"] < sft[0]["loss"]
    g = [r for r in rows if r["stage"] == "grpo1"]
    assert len(g) == 4 and all(0 <= r["reward_mean"] <= 1 for r in g)
    assert all(r["staleness_max"] <= 1 for r in g)
    assert list((Path(cfg.output_dir) / "tensorboard").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = Path(summary["export"])
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("12+34=", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_crashed_rollout_worker_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    """Kill the rollout actor's process mid-stage (by the PID it reports): Ray restarts it,
    it generates its unfinished groups again, and the learner trains every ticket once."""
    import ray
    import redis

    from nebula.transport.pacing import JobKeys
    from services.runner import JobRunner

    cfg = toy_config(tmp_path, rollout={"engine": "hf"},
                     stages=[{"type": "sft", "steps": 2, "batch_size": 8, "lr": 0.001},
                             {"type": "grpo", "steps": 8}])
    runner = JobRunner(cfg, job_id="crash")
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            time.sleep(0.5)
            if not ray.is_initialized():
                continue
            try:
                actor = ray.get_actor("crash-rollout-0")
                url = runner.summary.get("redis_url")
                if url is None:
                    continue
                r = redis.Redis.from_url(url)
                if int(r.get(JobKeys("crash-1").tickets) or 0) >= 8:  # mid-stage
                    pid = ray.get(actor.pid.remote(), timeout=10)
                    os.kill(pid, 9)
                    killed.append(pid)
            except Exception:  # noqa: BLE001 - not up yet
                continue

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = runner.run()
    t.join(timeout=5)
    assert killed, "the rollout worker was never killed"
    grpo = summary["stages"][1]
    assert grpo["steps"] == 8 and grpo["samples"] == 8 * 4 * 4
    tickets = grpo["tickets_trained"]
    assert sorted(tickets) == list(range(8 * 4))  # each ticket trained exactly once
