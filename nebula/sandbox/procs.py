"""Process plumbing of sandboxed runs: kill a run's process group, stream its output with a
cap, and reap the pid-namespace init that bubblewrap leaves behind (as a subreaper)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal as signal_mod
import time

_READ_CHUNK = 1 << 16


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group we created with start_new_session: its leader is the pid we
    started, so this kills that process too. Never kills by name. (Not `proc.kill()`: Popen
    polls first and could reap the process under asyncio's child watcher.)"""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal_mod.SIGKILL)


async def read_capped(stream: asyncio.StreamReader | None, cap: int) -> bytes:
    """Read to EOF, keeping the first `cap` bytes (the rest is drained so the writer never
    blocks on a full pipe)."""
    if stream is None:
        return b""
    buf = bytearray()
    while True:
        chunk = await stream.read(_READ_CHUNK)
        if not chunk:
            return bytes(buf)
        if len(buf) < cap:
            buf += chunk[: cap - len(buf)]


async def feed(stream: asyncio.StreamWriter | None, data: bytes) -> None:
    if stream is None:
        return
    try:
        if data:
            stream.write(data)
            await stream.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(Exception):
            stream.close()


_subreaper: bool | None = None


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER), so
    the sandbox's pid-namespace init can be reaped here. Process-wide and idempotent."""
    global _subreaper
    if _subreaper is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            _subreaper = False
    return _subreaper


def read_child_pid(fd: int) -> int | None:
    """The "child-pid" bubblewrap wrote on --info-fd (read without blocking)."""
    data = b""
    try:
        os.set_blocking(fd, False)
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    except (BlockingIOError, OSError):
        pass
    try:
        pid = json.loads(data).get("child-pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 1 else None


def _try_reap(pid: int) -> bool:
    """True once `pid` is reaped or is not ours to reap."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # not (or no longer) our child: someone else reaps it
    return done == pid


def reap_sync(pid: int | None, timeout_s: float = 2.0) -> None:
    if pid is None or not _subreaper:
        return
    deadline = time.monotonic() + timeout_s
    while not _try_reap(pid) and time.monotonic() < deadline:
        time.sleep(0.005)


async def reap(pid: int, timeout_s: float = 5.0) -> None:
    """Reap the orphaned sandbox init once it has exited (it dies with the sandbox)."""
    if _try_reap(pid):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.002
    while loop.time() < deadline:
        await asyncio.sleep(delay)
        if _try_reap(pid):
            return
        delay = min(delay * 2, 0.05)
