"""Supervision of the embedded default's child services, both halves.

Server side, `Supervisor`: keeps one child process (redis-server, `python -m verifier`,
`python -m teacher`) alive. When the child dies unexpectedly it is started again with the
same command line, so on the same port and (for Redis) reading the same AOF, after a backoff
(0.5 s doubling to 5 s); more than `max_restarts` deaths in a row, each within `stable_s` of
its start, and it gives up. Each restart is recorded (`restarts`) and logged. `stop()` ends the
child without a restart. On Kubernetes the Deployment plays this part.

Client side, `call_retrying` / `acall_retrying`: a gRPC call that finds the service
UNAVAILABLE (down, restarting, connection reset mid-call) is sent again, with the same
request, until the service answers or `retry_s` of outage have passed. The verifier and
teacher calls are pure functions of their request, so a retried call returns what the first
would have, and the caller writes its result once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("nebula.supervisor")
T = TypeVar("T")


@dataclass(frozen=True)
class Restart:
    """One unexpected death of the child, and the restart it caused."""

    at: float  # time.time() of the death
    pid: int
    returncode: int | None  # exit status, or -signal number
    signal: str | None  # "SIGKILL" when killed by a signal
    uptime_s: float
    delay_s: float  # backoff before the new start


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class _Stopped(Exception):
    pass


class Supervisor:
    """Run `spawn()` (a child process) and start it again whenever it dies unexpectedly.

    `spawn` must start the same command every time (the port is in the command or its
    config file). `ready(proc)` blocks until the new child serves (raising if it died or did
    not come up in time); `on_start(proc)` runs after each spawn (e.g. CPU affinity).
    Every spawn happens on the supervisor's own thread, which outlives the child it
    started: a `spawn` that sets PR_SET_PDEATHSIG (`die_with_parent(any_thread=True)`) ties
    the child to that thread, so it dies with this process however this process ends.
    A child started in its own session (`start_new_session=True`) has its whole process
    group killed when it dies, so none of its own children (a verifier's pool workers)
    outlive it into the restart.
    """

    def __init__(self, name: str, spawn: Callable[[], subprocess.Popen],
                 ready: Callable[[subprocess.Popen], None] | None = None, *,
                 on_start: Callable[[subprocess.Popen], None] | None = None,
                 max_restarts: int = 10, backoff_s: float = 0.5, max_backoff_s: float = 5.0,
                 stable_s: float = 60.0, start_timeout_s: float = 300.0,
                 stop_timeout_s: float = 15.0, poll_s: float = 5.0) -> None:
        self.name = name
        self._spawn = spawn
        self._ready = ready
        self._on_start = on_start
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.restarts: list[Restart] = []
        self.failed = False  # gave up after max_restarts deaths in a row
        self.generation = 0  # starts that reached ready (1 after start())
        self._proc: subprocess.Popen | None = None
        self._pgid: int | None = None
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._first_done = threading.Event()
        self._first_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def proc(self) -> subprocess.Popen | None:
        """The current child (a new object after each restart)."""
        return self._proc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Supervisor:
        """Start the child and wait until it is ready; raises what `ready` raised."""
        self._thread = threading.Thread(target=self._run, name=f"supervise-{self.name}",
                                        daemon=True)
        self._thread.start()
        log.info("waiting up to %.0f s for %s to start", self.start_timeout_s, self.name)
        if not self._first_done.wait(self.start_timeout_s + 10):
            self.stop()
            raise TimeoutError(f"{self.name} did not start within {self.start_timeout_s} s")
        if self._first_error is not None:
            self._thread.join(timeout=self.stop_timeout_s)
            raise self._first_error
        return self

    def wait_generation(self, generation: int, timeout_s: float) -> None:
        """Block until the child has been (re)started and is ready `generation` times in all
        (1 = the first start). Raises TimeoutError, or RuntimeError once the supervisor gave
        up or stopped."""
        log.info("waiting up to %.0f s for %s to be ready (start %d)", timeout_s, self.name,
                 generation)
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self.generation < generation:
                if self.failed or self._stopping.is_set():
                    raise RuntimeError(f"{self.name} is not supervised any more "
                                       f"(failed={self.failed})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} not ready (start {generation}) after "
                                       f"{timeout_s} s; {len(self.restarts)} restarts so far")
                self._cv.wait(min(left, 1.0))

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after stop_timeout_s) without a restart."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
            self._cv.notify_all()
        if proc is not None:
            _stop(proc, self.stop_timeout_s)
            self._kill_group()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.stop_timeout_s + 5)
            if self._thread.is_alive():
                log.warning("supervisor thread of %s did not end within %.0f s", self.name,
                            self.stop_timeout_s + 5)

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the supervising thread ---------------------------------------------------------

    def _launch(self) -> subprocess.Popen:
        with self._lock:
            if self._stopping.is_set():
                raise _Stopped
            proc = self._spawn()
            self._proc = proc
            self._started_at = time.monotonic()
            try:
                pgid = os.getpgid(proc.pid)
            except OSError:
                pgid = None
            self._pgid = pgid if pgid == proc.pid else None  # its own group: ours to kill
        try:
            if self._on_start is not None:
                self._on_start(proc)
            if self._ready is not None:
                self._ready(proc)
        except BaseException:
            _stop(proc, 0)
            self._kill_group()
            if self._stopping.is_set():
                raise _Stopped from None
            raise
        with self._cv:
            self.generation += 1
            self._cv.notify_all()
        return proc

    def _run(self) -> None:
        try:
            self._launch()
        except _Stopped:
            self._first_error = RuntimeError(f"{self.name} stopped while starting")
            self._first_done.set()
            return
        except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
            self._first_error = e
            self._first_done.set()
            return
        self._first_done.set()
        in_a_row = 0
        while True:
            proc = self._proc
            assert proc is not None
            self._wait_exit(proc)
            if self._stopping.is_set():
                return
            uptime = time.monotonic() - self._started_at
            self._kill_group()  # what the dead child started dies with it (before the reap)
            rc = self._reap(proc)
            in_a_row = 1 if uptime >= self.stable_s else in_a_row + 1
            if in_a_row > self.max_restarts:
                with self._cv:
                    self.failed = True
                    self._cv.notify_all()
                log.error("%s (pid %d) died (%s) after %.1f s: %d deaths in a row, each "
                          "within %.0f s of its start; giving up", self.name, proc.pid,
                          describe_exit(rc), uptime, in_a_row, self.stable_s)
                return
            delay = min(self.backoff_s * 2 ** (in_a_row - 1), self.max_backoff_s)
            sig = describe_exit(rc)[len("signal "):] if rc is not None and rc < 0 else None
            self.restarts.append(Restart(time.time(), proc.pid, rc, sig, uptime, delay))
            log.warning("%s (pid %d) died (%s) after %.1f s; restarting it in %.1f s "
                        "(restart %d, %d in a row, at most %d)", self.name, proc.pid,
                        describe_exit(rc), uptime, delay, len(self.restarts), in_a_row,
                        self.max_restarts)
            if self._stopping.wait(delay):
                return
            t0 = time.monotonic()
            try:
                new = self._launch()
            except _Stopped:
                return
            except Exception as e:  # noqa: BLE001 - counts as one more death in a row
                log.error("restart of %s failed: %s", self.name, e)
                continue
            log.warning("%s restarted as pid %d, ready in %.1f s", self.name, new.pid,
                        time.monotonic() - t0)

    def _wait_exit(self, proc: subprocess.Popen) -> None:
        """Block until `proc` has exited or stop() was called: on a pidfd where Linux has
        one (the child is left a zombie, so its PID and group stay ours until `_reap`),
        else by polling."""
        if proc.returncode is not None:
            return
        fd = None
        try:
            fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pass
        try:
            while not self._stopping.is_set():
                if fd is not None:
                    readable, _, _ = select.select([fd], [], [], self.poll_s)
                    if readable:
                        return
                else:
                    try:
                        proc.wait(timeout=0.2)
                        return
                    except subprocess.TimeoutExpired:
                        pass
        finally:
            if fd is not None:
                os.close(fd)

    def _reap(self, proc: subprocess.Popen) -> int | None:
        try:
            return proc.wait(timeout=self.stop_timeout_s)  # it has exited: returns at once
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) exited but could not be reaped", self.name, proc.pid)
            return proc.returncode

    def _kill_group(self) -> None:
        pgid = self._pgid
        if pgid is None:
            return
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _stop(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.poll() is None:
        if timeout_s > 0:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        log.error("pid %d did not exit 30 s after SIGKILL", proc.pid)


# -- clients of a supervised gRPC service ------------------------------------------------------

DEFAULT_RETRY_S = 120.0
_BACKOFF0_S, _BACKOFF_MAX_S, _LOG_EVERY_S = 0.1, 2.0, 15.0


def retryable(e: BaseException) -> bool:
    """An error that says the service is not there right now (down, restarting, or the
    connection broke mid-call), not that the request was wrong."""
    import grpc

    return isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE


class _Outage:
    def __init__(self, what: str, retry_s: float, stats: dict[str, Any] | None) -> None:
        self.what, self.retry_s, self.stats = what, retry_s, stats
        self.t0: float | None = None
        self.attempt = 0
        self.next_log = 0.0
        self.delay = _BACKOFF0_S

    def failed(self, e: BaseException) -> float:
        """Seconds to wait before the next attempt; raises `e` when the outage is too long."""
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
            if self.stats is not None:
                self.stats["outages"] = self.stats.get("outages", 0) + 1
        self.attempt += 1
        if self.stats is not None:
            self.stats["retries"] = self.stats.get("retries", 0) + 1
        left = self.t0 + self.retry_s - now
        details = e.details() if hasattr(e, "details") else str(e)  # type: ignore[union-attr]
        if left <= 0:
            log.error("%s unavailable for %.1f s (%s); giving up after %d attempts", self.what,
                      now - self.t0, details, self.attempt)
            raise e
        if now >= self.next_log:
            log.warning("%s unavailable (%s), retrying (attempt %d, for up to %.0f s more)",
                        self.what, details, self.attempt, left)
            self.next_log = now + _LOG_EVERY_S
        delay = min(self.delay, left)
        self.delay = min(self.delay * 2, _BACKOFF_MAX_S)
        return delay

    def ended(self) -> None:
        if self.t0 is not None:
            log.warning("%s answered again after %.1f s (%d retries)", self.what,
                        time.monotonic() - self.t0, self.attempt)


def call_retrying(fn: Callable[..., T], request: Any, *, timeout_s: float,
                  retry_s: float = DEFAULT_RETRY_S, what: str = "service",
                  stats: dict[str, Any] | None = None) -> T:
    """`fn(request, timeout=timeout_s)` (a gRPC stub method), sent again with the same
    request while the service is UNAVAILABLE, for up to `retry_s` from the first failure."""
    outage = _Outage(what, retry_s, stats)
    while True:
        try:
            out = fn(request, timeout=timeout_s)
        except Exception as e:
            if not retryable(e):
                raise
            time.sleep(outage.failed(e))
            continue
        outage.ended()
        return out


async def acall_retrying(fn: Callable[..., Awaitable[T]], request: Any, *, timeout_s: float,
                         retry_s: float = DEFAULT_RETRY_S, what: str = "service",
                         stats: dict[str, Any] | None = None) -> T:
    """asyncio `call_retrying`."""
    outage = _Outage(what, retry_s, stats)
    while True:
        try:
            out = await fn(request, timeout=timeout_s)
        except Exception as e:
            if not retryable(e):
                raise
            await asyncio.sleep(outage.failed(e))
            continue
        outage.ended()
        return out


# gRPC channel options for a client of a service that may restart: reconnect within about a
# second of it coming back (gRPC's default backoff grows to 120 s between attempts).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
