"""The embedded Redis and Ray head of `nebula serve` when no cluster is configured.

Both run detached (own session) and are recorded in a state file under the API's work dir:
running jobs need them while the API restarts, so a restarted API reattaches to the live
ones instead of starting new ones, and stops them (by PID) only when no job is active.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nebula.service_process import free_port
from nebula.transport.redis_server import find_redis_server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours still "exists": reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def stop_pid(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM `pid`, SIGKILL after `timeout_s`; reaps it when it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.1)


class _Detached:
    """A daemon started once per work dir, found again through its state file."""

    name = "daemon"

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.dir / f"{self.name}.json"
        self.state: dict[str, Any] = {}

    def _load(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state if _alive(int(state.get("pid", -1))) and self._healthy(state) else None

    def _healthy(self, state: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _spawn(self) -> dict[str, Any]:
        raise NotImplementedError

    def ensure(self) -> dict[str, Any]:
        """The running daemon's state (reattached, or started now)."""
        state = self._load()
        self.reattached = state is not None
        if state is None:
            state = self._spawn()
            self.state_file.write_text(json.dumps(state))
        self.state = state
        return state

    def stop(self) -> None:
        if self.state.get("pid"):
            stop_pid(int(self.state["pid"]))
        self.state_file.unlink(missing_ok=True)

    def _popen(self, args: list[str], env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.Popen:
        log = (self.dir / f"{self.name}.log").open("ab")
        # Own session: a Ctrl-C or SIGKILL of the API's process group leaves it running.
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})},
                                cwd=cwd)

    @staticmethod
    def _wait(proc: subprocess.Popen, ready: Any, what: str, log: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    stop_pid(proc.pid)
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"{what} did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)


class LocalRedis(_Detached):
    """redis-server with the append-only file on: job records survive any restart."""

    name = "redis"

    def _healthy(self, state: dict[str, Any]) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(state["url"], socket_timeout=2).ping())
        except (redis.RedisError, KeyError):
            return False

    def _spawn(self) -> dict[str, Any]:
        port = free_port()
        proc = self._popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                            "--dir", str(self.dir.resolve()), "--save", "",
                            "--appendonly", "yes", "--appendfsync", "everysec",
                            "--daemonize", "no", "--loglevel", "warning"])
        state = {"pid": proc.pid, "url": f"redis://127.0.0.1:{port}/0"}
        self._wait(proc, lambda: self._healthy(state), "redis-server", self.dir / "redis.log", 30)
        return state


class LocalRay(_Detached):
    """A Ray head on loopback with the dashboard (the job-submission endpoint)."""

    name = "ray"

    def __init__(self, state_dir: Path, num_cpus: int | None = None,
                 object_store_mb: int | None = None, cwd: Path | None = None) -> None:
        super().__init__(state_dir)
        self.cwd = cwd  # actors run here: relative config paths resolve as for the driver
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.object_store_mb = object_store_mb

    def _healthy(self, state: dict[str, Any]) -> bool:
        import httpx

        try:
            # The job-submission module answers last.
            if httpx.get(f"{state['dashboard']}/api/jobs/", timeout=3).status_code != 200:
                return False
        except (httpx.HTTPError, KeyError):
            return False
        return self._job_agent_ready(state)

    @staticmethod
    def _job_agent_ready(state: dict[str, Any]) -> bool:
        """The head's job agent has registered: before that the dashboard answers, but every
        submission fails with "No available agent to submit job". The dashboard looks the
        agent up the same way (head node id, then the agent's address in the GCS KV)."""
        try:
            from ray._private import ray_constants as rc
            from ray._raylet import GcsClient
            from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
        except ImportError:  # another Ray layout: submissions retry instead (JobService)
            return True
        try:
            gcs = GcsClient(address=state["gcs_address"])
            head = gcs.internal_kv_get(rc.KV_HEAD_NODE_ID_KEY, namespace=rc.KV_NAMESPACE_JOB,
                                       timeout=3)
            if not head:
                return False
            key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head.decode()}".encode()
            return bool(gcs.internal_kv_get(key, namespace=rc.KV_NAMESPACE_DASHBOARD, timeout=3))
        except KeyError:
            return True  # a state file from before gcs_address was kept: as before
        except Exception:  # noqa: BLE001 - GCS not up yet, or an unknown Ray version
            return False

    def _spawn(self) -> dict[str, Any]:
        # Socket paths under the temp dir must fit in 107 bytes: a short dir in /tmp.
        tmp = tempfile.mkdtemp(prefix="nray-api-", dir="/tmp")
        gcs, dash = free_port(), free_port()
        args = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start",
                "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}", f"--num-cpus={self.num_cpus}", f"--temp-dir={tmp}",
                # Private ports, so a second Ray on this machine never collides with ours.
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                "--disable-usage-stats"]
        if self.object_store_mb:
            args.append(f"--object-store-memory={self.object_store_mb << 20}")
        proc = self._popen(args, {"RAY_AUTH_MODE": "disabled"}, cwd=self.cwd)
        state = {"pid": proc.pid, "dashboard": f"http://127.0.0.1:{dash}",
                 "gcs_address": f"127.0.0.1:{gcs}", "temp_dir": tmp}
        self._wait(proc, lambda: self._healthy(state), "ray head", self.dir / "ray.log", 120)
        return state

    def stop(self) -> None:
        super().stop()
        if self.state.get("temp_dir"):
            shutil.rmtree(self.state["temp_dir"], ignore_errors=True)
