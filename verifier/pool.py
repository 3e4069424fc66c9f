"""A process pool for CPU-bound verifiers in which every task has a deadline.

concurrent.futures.ProcessPoolExecutor cannot stop a running task, so one hostile item
(a regex that backtracks forever, an expression that never finishes simplifying) would
hold a worker, and the batch, forever. Here each worker is a process we started and talk
to over its own pipe; when the task it is running passes its deadline we kill that worker
by PID and start a replacement, and only that item fails.

Each worker gets up to `depth` tasks at once (the next ones wait in its pipe), so it never
idles for a round trip between tasks, and tasks handed over together share one pipe write;
tasks queued behind a killed worker are dispatched again, not failed. Workers are spawned (not forked) because the gRPC server has threads.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any


HEAD_GRACE_S = 1.0


class DeadlineExceeded(TimeoutError):
    """The task did not finish before its deadline."""


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
        for fn, args in msg:  # a list of tasks; each result goes back on its own
            try:
                conn.send(("ok", fn(*args)))
            except BaseException as e:  # noqa: BLE001 - report everything, keep serving
                conn.send(("err", (type(e).__name__, str(e), traceback.format_exc(limit=8))))


@dataclass(eq=False)
class _Task:
    fn: Callable[..., Any]
    args: tuple
    deadline: float  # loop.time()
    future: asyncio.Future
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Worker:
    proc: Any
    conn: Connection
    inflight: deque[_Task] = field(default_factory=deque)  # sent, in order; [0] is running
    head_timer: asyncio.TimerHandle | None = None
    dead: bool = False


class ProcessWorkerPool:
    def __init__(self, size: int, init: Callable[..., None] | None = None,
                 init_args: tuple = (), depth: int = 4, start_timeout_s: float = 120.0) -> None:
        self.size = size
        self.depth = depth
        self._init = init
        self._init_args = init_args
        self._start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._ready: list[_Worker] = []
        self._pending: deque[_Task] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.restarts = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))

    # -- workers ------------------------------------------------------------------------

    async def _spawn(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._init, self._init_args),
                                 daemon=True)
        proc.start()
        child.close()
        w = _Worker(proc, parent)
        try:
            ok = await asyncio.wait_for(self._loop.run_in_executor(None, parent.poll,
                                                                   self._start_timeout_s),
                                        self._start_timeout_s + 5)
            msg = parent.recv() if ok else None
        except BaseException:
            self._terminate(w)
            raise
        if not msg or msg[0] != "ready":
            self._terminate(w)
            raise WorkerCrashed(f"worker failed to start (exit code {proc.exitcode})")
        if self._closed:
            self._terminate(w)
            return
        self._loop.add_reader(parent.fileno(), self._on_readable, w)
        self._ready.append(w)
        self._dispatch()

    def _terminate(self, w: _Worker) -> None:
        w.dead = True
        if w.head_timer:
            w.head_timer.cancel()
        if w in self._ready:
            self._ready.remove(w)
            self._loop.remove_reader(w.conn.fileno())
        if w.proc.is_alive():
            w.proc.kill()  # our own child, by PID
        w.proc.join(timeout=5)
        w.conn.close()

    def _replace(self, w: _Worker, head_error: BaseException) -> None:
        """Kill w; fail the task it was running; re-dispatch the ones queued behind it."""
        inflight = list(w.inflight)
        self._terminate(w)
        self.restarts += 1
        if inflight:
            self._fail(inflight[0], head_error)
            self._pending.extendleft(reversed(inflight[1:]))
        if not self._closed:
            t = self._loop.create_task(self._spawn())
            t.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._dispatch()

    # -- tasks --------------------------------------------------------------------------

    def _fail(self, task: _Task, error: BaseException) -> None:
        if task.timer:
            task.timer.cancel()
        if not task.future.done():
            task.future.set_exception(error)

    def _dispatch(self) -> None:
        """Hand pending tasks to workers with free slots, least loaded first; all tasks a
        worker gets in one pass travel in one pipe message (one write, one wake-up)."""
        while self._pending:
            live = [w for w in self._ready if not w.dead and len(w.inflight) < self.depth]
            if not live:
                return
            w = min(live, key=lambda w: len(w.inflight))
            batch: list[_Task] = []
            while self._pending and len(w.inflight) + len(batch) < self.depth:
                task = self._pending.popleft()
                if not task.future.done():
                    batch.append(task)
            if not batch:
                continue
            try:
                w.conn.send([(t.fn, t.args) for t in batch])
            except (OSError, ValueError):
                self._pending.extendleft(reversed(batch))
                self._replace(w, WorkerCrashed("worker pipe closed"))
                return
            was_idle = not w.inflight
            w.inflight.extend(batch)
            if was_idle:
                self._arm_head(w)

    def _arm_head(self, w: _Worker) -> None:
        """The head task is running: kill the worker if it is still running at its deadline."""
        if w.head_timer:
            w.head_timer.cancel()
            w.head_timer = None
        if w.inflight:
            head = w.inflight[0]
            now = self._loop.time()
            # A head whose caller already gave up gets a short grace before the kill:
            # most such tasks are quick, and a respawn costs a second or two.
            at = now + HEAD_GRACE_S if head.future.done() else max(head.deadline, now)
            w.head_timer = self._loop.call_at(at, self._head_expired, w, head)

    def _head_expired(self, w: _Worker, task: _Task) -> None:
        if not w.dead and w.inflight and w.inflight[0] is task:
            self._replace(w, DeadlineExceeded("task exceeded its deadline; worker killed"))

    def _on_readable(self, w: _Worker) -> None:
        try:
            while not w.dead and w.conn.poll():
                kind, payload = w.conn.recv()
                task = w.inflight.popleft()
                if task.timer:
                    task.timer.cancel()
                if not task.future.done():
                    if kind == "ok":
                        task.future.set_result(payload)
                    else:
                        task.future.set_exception(TaskError(*payload))
                self._arm_head(w)
        except (EOFError, OSError):
            self._replace(w, WorkerCrashed(f"worker {w.proc.pid} exited"
                                           f" (exit code {w.proc.exitcode})"))
            return
        self._dispatch()

    def _task_expired(self, task: _Task) -> None:
        """Deadline of a task not (yet) running: fail it; a queued copy is skipped later."""
        if task in self._pending:
            self._pending.remove(task)
            self._fail(task, DeadlineExceeded("no free worker before the deadline"))
        elif not task.future.done() and not any(w.inflight and w.inflight[0] is task
                                                for w in self._ready):
            # Queued in a worker's pipe behind a slow task: fail it now; the worker still
            # runs it later and the result is dropped (see _arm_head for the grace).
            self._fail(task, DeadlineExceeded("no free worker before the deadline"))
        # A running task is handled by its worker's head timer (which also kills it).

    async def run(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
        """Run fn(*args) in a worker; the deadline covers waiting for a free worker too."""
        if self._loop is None or self._closed:
            raise RuntimeError("pool is not running")
        task = _Task(fn, args, self._loop.time() + timeout_s, self._loop.create_future())
        task.timer = self._loop.call_at(task.deadline, self._task_expired, task)
        self._pending.append(task)
        self._dispatch()
        try:
            return await task.future
        except asyncio.CancelledError:
            self._fail(task, DeadlineExceeded("cancelled"))
            raise

    async def close(self) -> None:
        self._closed = True
        for w in list(self._ready):
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in list(self._ready):
            for t in w.inflight:
                self._fail(t, WorkerCrashed("pool closed"))
            self._terminate(w)
        while self._pending:
            self._fail(self._pending.popleft(), WorkerCrashed("pool closed"))
