"""CPU binding of the embedded default's roles on one CPU-only machine: the learner and the
rollout engines get disjoint cores, as if they were separate devices. Used by the runner (which
cores each actor gets) and inside the actors (pinning themselves)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from nebula.config.job import JobConfig


def cpus_needed(cfg: JobConfig) -> int:
    """Logical CPUs a local Ray must offer for the job's actors (`nebula.resources`)."""
    import math

    from nebula.resources import job_resources

    return math.ceil(job_resources(cfg)["CPU"] - 1e-9)


def cpu_binding(cfg: JobConfig) -> dict[str, str] | None:
    """On one CPU-only machine (the embedded default), the cores each role may use: the learner
    gets core 0, the rollout engines the rest, as if they were separate devices; the host-side
    work (the embedded redis-server and verifier service, each rollout worker's scoring and
    stream-write thread) shares the learner's core, off the engines'. The teacher service
    floats: its forward passes are heavy and the learner already waits on it. Otherwise
    (a cluster, GPUs, a single core) None: the scheduler decides. Both benchmarks modes and
    the bare-engine measurement run under the same binding."""
    n = os.cpu_count() or 1
    if (cfg.cluster.ray_address or n < 2 or cfg.rollout.num_gpus > 0
            or cfg.learner.device == "cuda" or os.environ.get("NEBULA_NO_CPU_BIND")):
        return None
    return {"learner": "0", "rollout": "1" if n == 2 else f"1-{n - 1}"}


def apply_cpu_binding(role: str) -> None:
    """In an actor: pin this process (and what it spawns) to NEBULA_CPU_BIND's cores; vLLM's
    CPU backend binds its OpenMP threads to the same cores."""
    spec = os.environ.get("NEBULA_CPU_BIND")
    if not spec:
        return
    cores = parse_cores(spec)
    os.sched_setaffinity(0, cores)
    if role == "rollout":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec
    else:
        import torch

        torch.set_num_threads(len(cores))


def bind_thread_to_host_cores() -> None:
    """In a thread of a pinned rollout actor: move this thread (only; Linux affinity is per
    thread) to the host-side cores (NEBULA_HOST_CPU_BIND, the learner's). For the glue beside
    the engine - the scoring and stream-write thread - which on a cluster runs on host cores,
    not on the accelerator the engine's cores stand in for; on the engine's cores it takes
    its time from generation."""
    spec = os.environ.get("NEBULA_HOST_CPU_BIND")
    if spec:
        os.sched_setaffinity(0, parse_cores(spec))


def parse_cores(spec: str) -> set[int]:
    lo, _, hi = spec.partition("-")
    return set(range(int(lo), int(hi or lo) + 1))
