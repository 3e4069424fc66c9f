"""Start a verifier service as a child process (the embedded default, tests, benchmarks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"verifier service exited with {proc.returncode}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"verifier service at {address} not healthy after {timeout_s}s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def verifier_process(work_dir: Path, config: dict[str, Any] | None = None,
                     env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A `python -m verifier` child on loopback; yields address, metrics port, log path."""
    work_dir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    cfg = {"host": "127.0.0.1", "port": port, "metrics_port": metrics_port, **(config or {})}
    if cfg.get("port") in (0, None):
        cfg["port"] = port
    port = cfg["port"]
    cfg_path = work_dir / f"verifier-{port}.json"
    cfg_path.write_text(json.dumps(cfg))
    log_path = work_dir / f"verifier-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "verifier", "--config", str(cfg_path)],
                                env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        wait_healthy(address, proc)
        yield {"address": address, "metrics_port": cfg.get("metrics_port"), "log": log_path,
               "proc": proc}
    finally:
        stop_process(proc)
