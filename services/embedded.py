"""The embedded default: what `nebula run` starts when no cluster is configured — a local
Ray, a Redis it owns, the verifier service and (for opd/mopd stages) a teacher service
hosting the job's `teachers` — and stops at the end.

Each service it starts is supervised (restarted on the same address when it dies); the
stack's `kill(name)` SIGKILLs one of them by PID for fault drills, and at the end every
death and restart is written to `<work_dir>/supervision.json`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

from nebula.config.job import JobConfig
from nebula.logfiles import verbose
from nebula.cpu_binding import parse_cores, cpu_binding, cpus_needed

log = logging.getLogger(__name__)
SERVICES = ("redis", "verifier", "teacher")


def _killer(supervisors: dict[str, Any]) -> Callable[[str], None]:
    """`kill(name)`: SIGKILL the current process of the supervised service `name` ("redis",
    "verifier", "teacher") and return once its supervisor has recorded the death (it then
    restarts it on the same address after its backoff; clients retry meanwhile)."""

    def kill(name: str) -> None:
        sup = supervisors.get(name)
        if sup is None:
            running = ", ".join(sorted(supervisors)) or "none"
            what = "not a service of the embedded default" if name not in SERVICES else \
                "not started by the embedded default for this job"
            raise ValueError(f"cannot kill {name!r}: {what} (supervised here: {running})")
        pid = sup.pid
        if pid is None or sup.failed:
            raise ValueError(f"cannot kill {name!r}: {sup.name} is not running "
                             f"(failed={sup.failed})")
        try:  # exited already (a zombie until its supervisor reaps it)? WNOWAIT: not reaped
            down = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            down = True
        if down:
            raise ValueError(f"cannot kill {name!r}: {sup.name} (pid {pid}) is down, being "
                             "restarted")
        seen = len(sup.restarts)
        log.warning("fault drill: SIGKILL to %s (pid %d)", sup.name, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            raise ValueError(f"cannot kill {name!r}: pid {pid} of {sup.name} is gone") from None
        deadline = time.monotonic() + 15
        while len(sup.restarts) == seen and not sup.failed and time.monotonic() < deadline:
            time.sleep(0.02)  # the supervisor's pidfd wakes it at once: this is quick

    return kill


def _write_record(path: Path, supervisors: dict[str, Any]) -> None:
    """Every supervised service's starts and deaths, for drills and post-mortems."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            name: {"name": sup.name, "generation": sup.generation, "failed": sup.failed,
                   "restarts": [asdict(r) for r in sup.restarts]}
            for name, sup in supervisors.items()}, indent=2))
    except OSError as e:
        log.warning("could not write %s: %s", path, e)


@contextlib.contextmanager
def embedded_stack(cfg: JobConfig, work_dir: Path) -> Iterator[dict[str, Any]]:
    """Yields {"redis_url", "verifier_address", "teacher_address", "kill"} with Ray
    initialised (teacher_address is None when no stage needs a teacher; `kill(name)` SIGKILLs
    the supervised "redis", "verifier" or "teacher" this stack started, a ValueError for any
    other name); cleans up on exit and writes `work_dir/supervision.json`."""
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
    supervisors: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        # runs last: after every service stopped
        stack.callback(_write_record, Path(work_dir) / "supervision.json", supervisors)
        redis_url, redis, verifier = cl.redis_url, None, None
        if redis_url is None:
            redis = stack.enter_context(EmbeddedRedis(
                work_dir / "redis", persist=True, fsync="always", fresh=True,
                supervise={"on_start": host_cores}))
            redis_url = redis.url
            supervisors["redis"] = redis.supervisor
        verifier_address = cl.verifier_address
        if verifier_address is None:
            vcfg = cl.verifier.model_dump()
            vcfg.update(port=0, metrics_port=None, host="127.0.0.1")
            verifier = stack.enter_context(verifier_process(
                work_dir / "verifier", vcfg, supervise={"on_start": host_cores}))
            verifier_address = verifier["address"]
            supervisors["verifier"] = verifier["supervisor"]
        teacher_address = cl.teacher_address
        if teacher_address is None and cfg.teacher_names():
            from nebula.clients.teacher import teacher_process

            tcfg = {"port": 0, "metrics_port": None, "host": "127.0.0.1",
                    "teachers": [t.model_dump() for t in cfg.teachers]}
            srv = stack.enter_context(teacher_process(work_dir / "teacher", tcfg,
                                                      supervise=True))
            teacher_address = srv["address"]
            supervisors["teacher"] = srv["supervisor"]
        if not ray.is_initialized():
            # ray.init replaces the driver's SIGTERM handler with sys.exit: a caller that set
            # its own (the REST job driver logs a cancel at once) gets it back below.
            own_term = signal.getsignal(signal.SIGTERM)
            if cl.ray_address:
                ray.init(address=cl.ray_address, log_to_driver=verbose())
            else:
                # A private local Ray on loopback: its own temp dir (short path: Ray's socket
                # names must fit in 107 bytes) and no token file written to ~/.ray.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                tmp = tempfile.mkdtemp(prefix="nray-", dir="/tmp")
                ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed(cfg)),
                         include_dashboard=False, _temp_dir=tmp, log_to_driver=verbose(),
                         configure_logging=True, logging_level="WARNING")
            stack.callback(ray.shutdown)
            if callable(own_term) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, own_term)
        yield {"redis_url": redis_url, "verifier_address": verifier_address,
               "teacher_address": teacher_address, "kill": _killer(supervisors)}
