"""The deadline-enforcing process pool: kill and replace, never hang, never lose a worker."""

from __future__ import annotations

import os
import time

import pytest

from verifier.pool import DeadlineExceeded, ProcessWorkerPool, TaskError, WorkerCrashed


def _sleep_then(value: int, seconds: float) -> int:
    time.sleep(seconds)
    return value


def _boom() -> None:
    raise ValueError("bad thing")


def _die() -> None:
    os._exit(3)


async def test_deadline_kills_only_the_slow_task() -> None:
    pool = ProcessWorkerPool(2)
    await pool.start()
    try:
        import asyncio

        t0 = time.monotonic()
        slow = pool.run(_sleep_then, (1, 60), timeout_s=0.5)
        fast = pool.run(_sleep_then, (2, 0.01), timeout_s=5)
        results = await asyncio.gather(slow, fast, return_exceptions=True)
        assert isinstance(results[0], DeadlineExceeded) and results[1] == 2
        assert time.monotonic() - t0 < 3
        assert pool.restarts == 1
        # The replacement comes up and the pool is whole again.
        assert await asyncio.gather(*(pool.run(_sleep_then, (i, 0.0), 30) for i in range(4))) \
            == [0, 1, 2, 3]
    finally:
        await pool.close()


async def test_errors_and_crashes_are_reported() -> None:
    pool = ProcessWorkerPool(1)
    await pool.start()
    try:
        with pytest.raises(TaskError, match="bad thing") as ei:
            await pool.run(_boom, (), 10)
        assert ei.value.type_name == "ValueError"
        with pytest.raises(WorkerCrashed):
            await pool.run(_die, (), 10)
        assert await pool.run(_sleep_then, (7, 0.0), 30) == 7
    finally:
        await pool.close()


async def test_deadline_covers_queueing() -> None:
    pool = ProcessWorkerPool(1)
    await pool.start()
    try:
        import asyncio

        busy = asyncio.ensure_future(pool.run(_sleep_then, (1, 1.0), 5))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded, match="no free worker"):
            await pool.run(_sleep_then, (2, 0.0), 0.2)
        assert await busy == 1
    finally:
        await pool.close()
