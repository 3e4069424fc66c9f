"""A real toy job through the REST API end to end (embedded Ray via the Job Submission API,
the API's Redis, the verifier service, learner and rollout actors): submit, running,
metrics, SSE events, checkpoints, succeeded; and an API restart in the middle of it.

One job serves both tests (they run in order) to keep the suite short."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import api_procs
from api_procs import ApiServer, api_server, toy_job, wait_for

api_work = api_procs.api_work  # the shared session fixture

pytestmark = pytest.mark.slow
TOKEN = "tok-life"
CFG = {"tokens": {TOKEN: "life"}, "quotas": {"life": {"max_concurrent_jobs": 1}}}


@pytest.fixture(scope="module")
def srv(api_work: Path) -> Iterator[ApiServer]:
    with api_server(api_work, CFG, "life") as s:
        yield s


@pytest.fixture(scope="module")
def job(srv: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from services.sdk import NebulaClient

    cfg = toy_job(tmp_path_factory.mktemp("life"), sft_steps=40, grpo_steps=3)
    with NebulaClient(srv.url, TOKEN) as c:
        view = c.submit(cfg)
    assert view["state"] in ("starting", "running")
    return view


def test_api_restart_mid_job_keeps_the_record(srv: ApiServer, job: dict[str, Any]) -> None:
    from services.sdk import NebulaClient

    with NebulaClient(srv.url, TOKEN) as c:
        wait_for(lambda: c.metrics(job["id"])["points"], 240, "the first metrics points")
        before = c.get(job["id"])
        assert before["state"] == "running" and before["started_at"]
        n_points = len(c.metrics(job["id"], limit=10_000)["points"])
    srv.stop()  # SIGTERM to uvicorn, mid-job
    srv.start()  # a new API process on the same Redis (and the same, reattached, Ray)
    with NebulaClient(srv.url, TOKEN) as c:
        after = c.get(job["id"])
        assert after["state"] in ("running", "succeeded"), after
        assert after["created_at"] == before["created_at"]
        assert after["started_at"] == before["started_at"]
        assert len(c.metrics(job["id"], limit=10_000)["points"]) >= n_points
    assert "reattached" in srv.tail(), "the restarted API should reuse the running Ray"


def test_whole_lifecycle_through_rest(srv: ApiServer, job: dict[str, Any]) -> None:
    from services.sdk import NebulaClient

    events: list[tuple[str, Any]] = []
    with NebulaClient(srv.url, TOKEN) as c:
        # The SSE stream from the start: the history replays, then live, then `end`.
        t = threading.Thread(target=lambda: events.extend(c.events(job["id"])), daemon=True)
        t.start()
        final = wait_for(lambda: (v := c.get(job["id"]))["state"] in
                         ("succeeded", "failed", "cancelled") and v, 600, "the job to end",
                         every_s=2)
        assert final["state"] == "succeeded", (final["error"], c.logs(job["id"])["lines"][-40:])
        t.join(timeout=60)
        kinds = [k for k, _ in events]
        assert kinds and kinds[-1] == "end"
        states = [d["state"] for k, d in events if k == "state"]
        assert "running" in states and states[-1] == "succeeded"
        assert {"metrics", "log", "eval"} <= set(kinds)

        points = c.metrics(job["id"], limit=10_000)["points"]
        stages = {p["stage"] for p in points}
        assert {"sft0", "grpo1"} <= stages
        assert all({"seq", "time", "step"} <= p.keys() for p in points)
        assert any("reward_mean" in p for p in points if p["stage"] == "grpo1")
        page = c.metrics(job["id"], since=points[1]["seq"], limit=2)["points"]
        assert [p["seq"] for p in page] == [points[2]["seq"], points[3]["seq"]]

        assert final["policy_version"] is not None and final["latest_metrics"]
        kinds_ck = {ck["kind"] for ck in final["checkpoints"]}
        assert {"checkpoint", "export"} <= kinds_ck, final["checkpoints"]
        assert all(Path(ck["path"]).is_dir() for ck in final["checkpoints"])
        assert [e["when"] for e in final["evals"]][-1].startswith("after")
        lines = c.logs(job["id"], limit=10_000)["lines"]
        assert any("stage 0: sft" in line for line in lines)
        assert any(f"job {job['id']} succeeded" in line for line in lines)
        assert final["finished_at"] >= final["started_at"] >= final["created_at"]
        # The view ends on the last stage's last step, not where progress polling stopped.
        assert (final["stage"], final["step"], final["total_steps"]) == ("grpo1", 3, 3), final


def test_a_failed_jobs_record_starts_with_a_one_line_root_cause() -> None:
    """A Ray task error is unwrapped to what the actor raised; colour codes and the
    traceback stay out of the record (they are in the job's log)."""
    import ray

    from services.jobs.process import root_cause

    inner = FileNotFoundError("dataset file not found: runs/data/addition_train.jsonl")
    wrapped = ray.exceptions.RayTaskError(
        "LearnerWorker.run_offline", "Traceback (most recent call last):\n  ...", inner)
    assert root_cause(wrapped) == ("FileNotFoundError: dataset file not found: "
                                   "runs/data/addition_train.jsonl")
    assert root_cause(RuntimeError("\x1b[36mthe learner died 2 times\x1b[39m\nmore")) == \
        "RuntimeError: the learner died 2 times"
