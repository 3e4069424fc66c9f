"""What a job asks of a Ray cluster, counted once from its config: the REST queue's quotas,
`nebula run`'s capacity check and the Kubernetes RayCluster test all use `job_resources`.

The learner's ranks and the rollout workers are Ray actors with the resources their config
names; the services a job starts itself (Redis, verifier, teacher of the embedded default)
run as processes of the driver, outside Ray's accounting, and small Ray actors (the weight
store) reserve nothing."""

from __future__ import annotations

from collections import Counter
from typing import Any


class InsufficientResources(ValueError):
    """The cluster cannot hold what the job asks for (names the numbers)."""


def learner_bundle(learner: Any) -> dict[str, float]:
    """One learner rank's placement-group bundle."""
    b = {"CPU": float(learner.num_cpus_per_rank), **learner.resources_per_rank}
    if learner.num_gpus_per_rank > 0:
        b["GPU"] = float(learner.num_gpus_per_rank)
    return b


def rollout_bundle(rollout: Any) -> dict[str, float]:
    """One rollout worker's resources."""
    b = {"CPU": float(rollout.num_cpus), **rollout.resources}
    if rollout.num_gpus > 0:
        b["GPU"] = float(rollout.num_gpus)
    return b


def job_resources(cfg: Any) -> dict[str, float]:
    """Total Ray resources of a JobConfig: learner ranks x per-rank + rollout workers x
    per-worker (CPU, GPU and custom resources), CPU and GPU always present."""
    total: Counter[str] = Counter({"CPU": 0.0, "GPU": 0.0})
    for _ in range(cfg.learner.ranks):
        total.update(learner_bundle(cfg.learner))
    for _ in range(cfg.rollout.workers):
        total.update(rollout_bundle(cfg.rollout))
    return {k: float(v) for k, v in total.items()}


def check_capacity(asked: dict[str, float], available: dict[str, float],
                   what: str = "the cluster") -> None:
    """Raise InsufficientResources naming every resource the job asks more of than
    `available` (Ray's `cluster_resources()`) holds in total."""
    short = [f"{k}: asked {v:g}, {what} has {available.get(k, 0.0):g}"
             for k, v in sorted(asked.items()) if v > available.get(k, 0.0) + 1e-9]
    if short:
        raise InsufficientResources(f"the job asks for more than {what} has ("
                                    + "; ".join(short) + ")")
