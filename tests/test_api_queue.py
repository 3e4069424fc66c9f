"""The admission policy on its own (pure functions of job records): per-tenant quotas of
jobs, CPUs and GPUs; priority, then FIFO; no overtaking; positions per tenant."""

from __future__ import annotations

from typing import Any

from services.api.settings import Quota
from services.jobs.queue import admit, fits_at_all, needs, positions


def rec(i: int, tenant: str = "t", state: str = "queued", priority: int = 0,
        cpus: float = 2.0, gpus: float = 0.0) -> dict[str, Any]:
    return {"id": f"j{i}", "tenant": tenant, "state": state, "priority": priority,
            "qseq": i, "cpus": cpus, "gpus": gpus}


def test_needs_counts_learner_and_rollout_actors() -> None:
    assert needs({"rollout": {"workers": 3, "num_cpus": 2, "num_gpus": 0.5}}) == (7.0, 1.5)
    assert needs({}) == (2.0, 0.0)


def test_priority_then_fifo_and_positions_per_tenant() -> None:
    jobs = [rec(1), rec(2, priority=5), rec(3), rec(4, tenant="u")]
    assert positions(jobs) == {"j2": 1, "j1": 2, "j3": 3, "j4": 1}
    quotas = {"t": Quota(max_concurrent_jobs=2), "u": Quota(max_concurrent_jobs=0)}
    assert admit(jobs, quotas.__getitem__) == ["j2", "j1"]


def test_running_jobs_use_up_the_quota_and_nothing_overtakes() -> None:
    q = Quota(max_concurrent_jobs=5, cpus=6, gpus=1)
    jobs = [rec(1, state="running", cpus=3), rec(2, cpus=4), rec(3, cpus=1)]
    assert admit(jobs, lambda t: q) == []  # j2 does not fit; j3 would, but waits its turn
    jobs[0]["state"] = "cancelled"
    assert admit(jobs, lambda t: q) == ["j2", "j3"]
    gpu = [rec(1, state="starting", gpus=1), rec(2, gpus=0.5)]
    assert admit(gpu, lambda t: q) == []


def test_a_job_larger_than_the_quota_is_refused_up_front() -> None:
    assert fits_at_all((3, 0), Quota(cpus=2)) is not None
    assert fits_at_all((1, 2), Quota(gpus=1)) is not None
    assert fits_at_all((3, 2), Quota()) is None
