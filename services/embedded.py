"""The embedded default: what `nebula run` starts when no cluster is configured — a local
Ray, a Redis it owns, the verifier service and (for opd/mopd stages) a teacher service
hosting the job's `teachers` — and stops at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from nebula.config.job import JobConfig, stage_teachers


@contextlib.contextmanager
def embedded_stack(cfg: JobConfig, work_dir: Path) -> Iterator[dict[str, Any]]:
    """Yields {"redis_url", "verifier_address", "teacher_address"} with Ray initialised
    (teacher_address is None when no stage needs a teacher); cleans up on exit."""
    import ray

    from nebula.transport.redis_server import EmbeddedRedis
    from verifier.launch import verifier_process

    cl = cfg.cluster
    with contextlib.ExitStack() as stack:
        redis_url, redis, verifier = cl.redis_url, None, None
        if redis_url is None:
            redis = stack.enter_context(EmbeddedRedis(work_dir / "redis"))
            redis_url = redis.url
        verifier_address = cl.verifier_address
        if verifier_address is None:
            vcfg = cl.verifier.model_dump()
            vcfg.update(port=0, metrics_port=None, host="127.0.0.1")
            verifier = stack.enter_context(verifier_process(work_dir / "verifier", vcfg))
            verifier_address = verifier["address"]
        bind = cpu_binding(cfg)
        if bind:  # host-side services off the rollout engines' cores (see cpu_binding)
            for proc in (getattr(redis, "proc", None), verifier and verifier["proc"]):
                if proc is not None:
                    os.sched_setaffinity(proc.pid, _cores(bind["learner"]))
        teacher_address = cl.teacher_address
        if teacher_address is None and any(stage_teachers(st) for st in cfg.stages):
            from teacher.client import teacher_process

            tcfg = {"port": 0, "metrics_port": None, "host": "127.0.0.1",
                    "teachers": [t.model_dump() for t in cfg.teachers]}
            srv = stack.enter_context(teacher_process(work_dir / "teacher", tcfg))
            teacher_address = srv["address"]
        if not ray.is_initialized():
            # ray.init replaces the driver's SIGTERM handler with sys.exit: a caller that set
            # its own (the REST job driver logs a cancel at once) gets it back below.
            own_term = signal.getsignal(signal.SIGTERM)
            if cl.ray_address:
                ray.init(address=cl.ray_address, log_to_driver=True)
            else:
                # A private local Ray on loopback: its own temp dir (short path: Ray's socket
                # names must fit in 107 bytes) and no token file written to ~/.ray.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                tmp = tempfile.mkdtemp(prefix="nray-", dir="/tmp")
                ray.init(num_cpus=max(os.cpu_count() or 1, _cpus_needed(cfg)),
                         include_dashboard=False, _temp_dir=tmp, log_to_driver=True,
                         configure_logging=True, logging_level="WARNING")
            stack.callback(ray.shutdown)
            if callable(own_term) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, own_term)
        yield {"redis_url": redis_url, "verifier_address": verifier_address,
               "teacher_address": teacher_address}


def _cpus_needed(cfg: JobConfig) -> int:
    return int(1 + cfg.rollout.workers * cfg.rollout.num_cpus + 0.999)


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
    cores = _cores(spec)
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
        os.sched_setaffinity(0, _cores(spec))


def _cores(spec: str) -> set[int]:
    lo, _, hi = spec.partition("-")
    return set(range(int(lo), int(hi or lo) + 1))
