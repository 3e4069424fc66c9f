"""A process pool for CPU-bound verifiers in which every task has a deadline.

concurrent.futures.ProcessPoolExecutor cannot stop a running task, so one hostile item
(a math expression that never finishes simplifying) would hold a worker, and the batch,
forever. Here each worker is a process we started and talk to over its own pipe; when a
task passes its deadline we kill that worker by PID and start a replacement, and only that
item fails. Workers are spawned (not forked) because the gRPC server process has threads.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


class DeadlineExceeded(TimeoutError):
    """The task did not finish before its deadline; its worker was killed."""


class WorkerCrashed(RuntimeError):
    """The worker process died while running the task (e.g. a segfault or OOM kill)."""


class TaskError(RuntimeError):
    """The task raised; carries the remote exception type name and traceback text."""

    def __init__(self, type_name: str, message: str, tb: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.tb = tb


def _worker_main(conn: Connection, init: Callable[..., None] | None, init_args: tuple) -> None:
    if init is not None:
        init(*init_args)
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        fn, args = msg
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - report everything, keep serving
            conn.send(("err", (type(e).__name__, str(e), traceback.format_exc(limit=8))))


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Worker:
    proc: Any
    conn: Connection


class ProcessWorkerPool:
    def __init__(
        self,
        size: int,
        init: Callable[..., None] | None = None,
        init_args: tuple = (),
        start_timeout_s: float = 120.0,
    ) -> None:
        self.size = size
        self._init = init
        self._init_args = init_args
        self._start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: set[_Worker] = set()
        self._closed = False
        self.restarts = 0

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))

    async def _spawn(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main, args=(child, self._init, self._init_args), daemon=True
        )
        proc.start()
        child.close()
        w = _Worker(proc, parent)
        self._all.add(w)
        try:
            kind, _ = await self._recv(w, self._start_timeout_s)
        except BaseException:
            self._kill(w)
            raise
        if kind != "ready":
            self._kill(w)
            raise WorkerCrashed(f"worker failed to start: {kind}")
        assert self._idle is not None
        self._idle.put_nowait(w)

    async def _recv(self, w: _Worker, timeout: float) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = w.conn.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(fd)
        try:
            return w.conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerCrashed(f"worker {w.proc.pid} exited (code {w.proc.exitcode})") from e

    def _kill(self, w: _Worker) -> None:
        self._all.discard(w)
        if w.proc.is_alive():
            w.proc.kill()  # our own child, by PID
        w.proc.join(timeout=5)
        w.conn.close()

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        self.restarts += 1
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._spawn())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def run(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
        """Run fn(*args) in a worker; the deadline covers waiting for a free worker too."""
        if self._idle is None or self._closed:
            raise RuntimeError("pool is not running")
        deadline = time.monotonic() + timeout_s
        try:
            w = await asyncio.wait_for(self._idle.get(), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"no free worker within {timeout_s:.3g}s") from None
        try:
            w.conn.send((fn, args))
            kind, payload = await self._recv(w, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self._replace(w)
            raise DeadlineExceeded(f"task exceeded its {timeout_s:.3g}s deadline") from None
        except WorkerCrashed:
            self._replace(w)
            raise
        except BaseException:
            self._replace(w)  # cancelled mid-task: the worker's state is unknown
            raise
        self._idle.put_nowait(w)
        if kind == "err":
            raise TaskError(*payload)
        return payload

    async def close(self) -> None:
        self._closed = True
        for w in list(self._all):
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in list(self._all):
            w.proc.join(timeout=2)
            self._kill(w)
