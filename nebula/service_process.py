"""Run a Nebula gRPC service (`python -m verifier`, `python -m teacher`) as a child process:
the embedded default, tests and benchmarks. Children are stopped by their PID."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(any_thread: bool = False) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGTERM when this process dies, however it dies
    (Linux PR_SET_PDEATHSIG): a driver killed with SIGKILL, or aborting in Ray's exit path,
    leaves no redis-server or verifier behind. None off Linux, and off the main thread (the
    signal fires when the forking *thread* exits, and only the main thread lives as long as
    the process) unless `any_thread`: for a thread that outlives the child it starts, such
    as a `nebula.supervisor.Supervisor`'s."""
    if not sys.platform.startswith("linux") or (
            not any_thread and threading.current_thread() is not threading.main_thread()):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    parent = os.getpid()

    def set_signal() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return set_signal


def _tail(log_path: Path | None, lines: int = 20) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return "\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(address: str, proc: subprocess.Popen, name: str = "service",
                 log_path: Path | None = None, timeout_s: float = 120.0) -> None:
    """Poll the standard gRPC health service until it says SERVING (or the child dies)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nebula.supervisor import RECONNECT_OPTIONS

    log.info("waiting up to %.0f s for %s at %s to report SERVING", timeout_s, name, address)
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address, options=RECONNECT_OPTIONS) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}{_tail(log_path)}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"{name} at {address} not healthy after {timeout_s}s{_tail(log_path)}")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def service_process(module: str, work_dir: Path, config: dict[str, Any],
                    env: dict[str, str] | None = None, timeout_s: float = 120.0,
                    supervise: bool | dict[str, Any] = False) -> Iterator[dict[str, Any]]:
    """`python -m MODULE --config FILE` on loopback; yields address, metrics port, log path,
    the process and its supervisor. A port of 0/None in `config` is replaced by a free one,
    chosen here and written into FILE, so a restart binds the same port.

    `supervise` (True, or a dict of `nebula.supervisor.Supervisor` options such as
    max_restarts, backoff_s, on_start): a `Supervisor` restarts the child with the same
    command line whenever it dies; "proc" is then the first child and
    `srv["supervisor"].proc` the current one. The log file collects every run's output."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"host": "127.0.0.1", **config}
    if cfg.get("port") in (0, None):
        cfg["port"] = free_port()
    port = cfg["port"]
    cfg_path = work_dir / f"{module}-{port}.json"
    cfg_path.write_text(json.dumps(cfg))
    log_path = work_dir / f"{module}-{port}.log"
    log_path.write_text("")
    address = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", module, "--config", str(cfg_path)]
    child_env = {**os.environ, **(env or {})}

    def spawn() -> subprocess.Popen:
        with log_path.open("a") as log:
            return subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_parent(any_thread=bool(supervise)),
                                    start_new_session=bool(supervise))

    if supervise:
        from nebula.supervisor import Supervisor

        opts = {"start_timeout_s": timeout_s, **(supervise if isinstance(supervise, dict)
                                                 else {})}
        sup = Supervisor(f"{module} service at {address}", spawn,
                         lambda p: wait_healthy(address, p, f"{module} service", log_path,
                                                timeout_s), **opts)
        sup.start()
        try:
            yield {"address": address, "metrics_port": cfg.get("metrics_port"), "log": log_path,
                   "proc": sup.proc, "supervisor": sup}
        finally:
            sup.stop()
        return
    proc = spawn()
    try:
        wait_healthy(address, proc, f"{module} service", log_path, timeout_s)
        yield {"address": address, "metrics_port": cfg.get("metrics_port"), "log": log_path,
               "proc": proc, "supervisor": None}
    finally:
        stop_process(proc)
