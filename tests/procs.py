"""Start real service processes for tests (by PID; stopped by PID)."""

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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"{address} not healthy after {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def verifier_server(tmp: Path, config: dict[str, Any] | None = None,
                    env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A real `python -m verifier` process on loopback; yields address, metrics port, log."""
    port, metrics_port = free_port(), free_port()
    cfg = {"host": "127.0.0.1", "port": port, "metrics_port": metrics_port, "workers": 2,
           **(config or {})}
    cfg_path = tmp / f"verifier-{port}.json"
    cfg_path.write_text(json.dumps(cfg))
    log_path = tmp / f"verifier-{port}.log"
    full_env = {**os.environ, **(env or {})}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "verifier", "--config", str(cfg_path)],
                                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        wait_healthy(address, proc)
        yield {"address": address, "metrics_port": metrics_port, "log": log_path, "proc": proc}
    finally:
        stop(proc)
