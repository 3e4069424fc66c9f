"""Admission: which queued jobs may start now. Pure functions of the job records, so the
policy is tested without Redis or Ray.

Each tenant has its own queue: higher priority first, FIFO (queue seq) within a priority,
and strictly in that order (no smaller job overtakes a waiting one, so a large job cannot
starve). A job starts when the tenant's launched (starting/running) jobs plus it stay within
the tenant's quota of concurrent jobs, CPUs and GPUs. queue_position is 1-based within the
tenant's queue: tenants never wait for each other.

What a job counts against its quota is what it reserves in Ray, counted once from its
validated config by `nebula.resources.job_resources`: learner ranks x (num_cpus_per_rank,
num_gpus_per_rank) + rollout workers x (num_cpus, num_gpus). An eval job has no learner:
its rollout workers only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from services.api.settings import Quota
from services.jobs.keys import LAUNCHED


def _model(config: Any) -> Any:
    """The validated JobConfig / EvalJobConfig of a config (a stored, validated dump is
    validated again; a model is used as it is)."""
    if not isinstance(config, dict):
        return config
    from nebula.config.job import JobConfig
    from nebula.evaluation import EvalJobConfig, is_eval_config

    model: type = EvalJobConfig if is_eval_config(config) else JobConfig
    return model.model_validate(config)


def parts(config: Any) -> list[tuple[str, str, int, dict[str, float]]]:
    """The Ray actors a job reserves resources for: (config field, what, count, resources of
    one) for the learner's ranks and the rollout workers."""
    from nebula.resources import learner_bundle, rollout_bundle

    cfg = _model(config)
    ro = cfg.rollout
    if getattr(cfg, "kind", None) == "eval":  # EvalRolloutConfig: no custom resources
        one = {"CPU": float(ro.num_cpus), **({"GPU": float(ro.num_gpus)} if ro.num_gpus else {})}
        return [("rollout", "rollout workers", ro.workers, one)]
    return [("learner", "learner ranks", cfg.learner.ranks, learner_bundle(cfg.learner)),
            ("rollout", "rollout workers", ro.workers, rollout_bundle(ro))]


def resources(config: Any) -> dict[str, float]:
    """Total Ray resources of a job (CPU and GPU always present, custom resources too):
    `nebula.resources.job_resources` of a training job; an eval job's rollout workers."""
    cfg = _model(config)
    if getattr(cfg, "kind", None) != "eval":
        from nebula.resources import job_resources

        return job_resources(cfg)
    total = {"CPU": 0.0, "GPU": 0.0}
    for _, _, n, one in parts(cfg):
        for k, v in one.items():
            total[k] = total.get(k, 0.0) + n * v
    return total


def needs(config: Any) -> tuple[float, float]:
    """(CPUs, GPUs) a job reserves in Ray (what counts against the tenant's quota)."""
    total = resources(config)
    return total["CPU"], total["GPU"]


def breakdown(config: Any, key: str) -> str:
    """How a job's total of one resource adds up, e.g. `learner ranks 2 x 1 + rollout
    workers 2 x 1`."""
    return " + ".join(f"{what} {n} x {one[key]:g}" for _, what, n, one in parts(config)
                      if one.get(key))


def fields_asking(config: Any, keys: list[str]) -> str:
    """The config sections (learner, rollout) that ask for any of `keys`."""
    return ", ".join(f for f, _, n, one in parts(config) if any(one.get(k) for k in keys)) \
        or "<root>"


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


def fits_at_all(rec_needs: tuple[float, float], quota: Quota,
                config: Any = None) -> str | None:
    """Why a job could never start under the quota (None if it could); with the job's
    config, the message says how its total adds up."""
    cpus, gpus = rec_needs
    for n, limit, key, unit in ((cpus, quota.cpus, "CPU", "CPUs"),
                                (gpus, quota.gpus, "GPU", "GPUs")):
        if limit is not None and n > limit + 1e-9:
            how = f" ({breakdown(config, key)})" if config is not None else ""
            return f"the job needs {n:g} {unit}{how}, the tenant's quota is {limit:g} {unit}"
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
