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

from nebula.config.job import JobConfig
from nebula.cpu_binding import parse_cores, cpu_binding, cpus_needed


@contextlib.contextmanager
def embedded_stack(cfg: JobConfig, work_dir: Path) -> Iterator[dict[str, Any]]:
    """Yields {"redis_url", "verifier_address", "teacher_address"} with Ray initialised
    (teacher_address is None when no stage needs a teacher); cleans up on exit."""
    import ray

    from nebula.transport.redis_server import EmbeddedRedis
    from verifier.launch import verifier_process

    cl = cfg.cluster
    bind = cpu_binding(cfg)

    def host_cores(proc: Any) -> None:
        # host-side services off the rollout engines' cores (see cpu_binding); again after
        # each restart
        if bind:
            os.sched_setaffinity(proc.pid, parse_cores(bind["learner"]))

    # Each service the embedded default owns is supervised: restarted on the same address
    # when it dies (its clients retry meanwhile). The job Redis keeps an AOF fsynced on every
    # write, so a restarted one has every acknowledged and pending group.
    with contextlib.ExitStack() as stack:
        redis_url, redis, verifier = cl.redis_url, None, None
        if redis_url is None:
            redis = stack.enter_context(EmbeddedRedis(
                work_dir / "redis", persist=True, fsync="always", fresh=True,
                supervise={"on_start": host_cores}))
            redis_url = redis.url
        verifier_address = cl.verifier_address
        if verifier_address is None:
            vcfg = cl.verifier.model_dump()
            vcfg.update(port=0, metrics_port=None, host="127.0.0.1")
            verifier = stack.enter_context(verifier_process(
                work_dir / "verifier", vcfg, supervise={"on_start": host_cores}))
            verifier_address = verifier["address"]
        teacher_address = cl.teacher_address
        if teacher_address is None and cfg.teacher_names():
            from nebula.clients.teacher import teacher_process

            tcfg = {"port": 0, "metrics_port": None, "host": "127.0.0.1",
                    "teachers": [t.model_dump() for t in cfg.teachers]}
            srv = stack.enter_context(teacher_process(work_dir / "teacher", tcfg,
                                                      supervise=True))
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
                ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed(cfg)),
                         include_dashboard=False, _temp_dir=tmp, log_to_driver=True,
                         configure_logging=True, logging_level="WARNING")
            stack.callback(ray.shutdown)
            if callable(own_term) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, own_term)
        yield {"redis_url": redis_url, "verifier_address": verifier_address,
               "teacher_address": teacher_address}
