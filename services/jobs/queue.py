"""Admission: which queued jobs may start now. Pure functions of the job records, so the
policy is tested without Redis or Ray.

Each tenant has its own queue: higher priority first, FIFO (queue seq) within a priority,
and strictly in that order (no smaller job overtakes a waiting one, so a large job cannot
starve). A job starts when the tenant's launched (starting/running) jobs plus it stay within
the tenant's quota of concurrent jobs, CPUs and GPUs. queue_position is 1-based within the
tenant's queue: tenants never wait for each other.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from services.api.settings import Quota
from services.jobs.keys import LAUNCHED


def needs(config: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) a job reserves in Ray: 1 learner CPU (none for an eval job) + its rollout
    actors."""
    ro = config.get("rollout") or {}
    workers = int(ro.get("workers", 1))
    learner = 0.0 if config.get("kind") == "eval" else 1.0
    return (learner + workers * float(ro.get("num_cpus", 1.0)),
            workers * float(ro.get("num_gpus", 0.0)))


def order_key(rec: dict[str, Any]) -> tuple[int, int]:
    return -int(rec.get("priority", 0)), int(rec.get("qseq", rec.get("seq", 0)))


def _queues(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    q: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        if rec["state"] == "queued":
            q[rec["tenant"]].append(rec)
    for jobs in q.values():
        jobs.sort(key=order_key)
    return q


def positions(records: list[dict[str, Any]]) -> dict[str, int]:
    """Job id -> 1-based position in its tenant's queue."""
    return {rec["id"]: i + 1 for jobs in _queues(records).values() for i, rec in enumerate(jobs)}


def fits_at_all(rec_needs: tuple[float, float], quota: Quota) -> str | None:
    """Why a job could never start under the quota (None if it could)."""
    cpus, gpus = rec_needs
    if quota.cpus is not None and cpus > quota.cpus:
        return f"the job needs {cpus:g} CPUs, the tenant's quota is {quota.cpus:g}"
    if quota.gpus is not None and gpus > quota.gpus:
        return f"the job needs {gpus:g} GPUs, the tenant's quota is {quota.gpus:g}"
    return None


def admit(records: list[dict[str, Any]], quota_of: Callable[[str], Quota]) -> list[str]:
    """Ids of queued jobs to start now, in start order."""
    used: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for rec in records:
        if rec["state"] in LAUNCHED:
            u = used[rec["tenant"]]
            u[0] += 1
            u[1] += rec.get("cpus", 0.0)
            u[2] += rec.get("gpus", 0.0)
    start: list[str] = []
    for tenant, jobs in _queues(records).items():
        q, u = quota_of(tenant), used[tenant]
        for rec in jobs:
            cpus, gpus = rec.get("cpus", 0.0), rec.get("gpus", 0.0)
            if (u[0] + 1 > q.max_concurrent_jobs
                    or (q.cpus is not None and u[1] + cpus > q.cpus + 1e-9)
                    or (q.gpus is not None and u[2] + gpus > q.gpus + 1e-9)):
                break  # strict order: nothing behind the head of the queue overtakes it
            u[0] += 1
            u[1] += cpus
            u[2] += gpus
            start.append(rec["id"])
    return start
