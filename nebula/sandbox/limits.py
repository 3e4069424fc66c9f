"""Why a sandboxed run stopped: the limits it hit, read from how the process ended (wall
clock, SIGXCPU, SIGXFSZ) and from the exceptions it reported (structured `"exc"` objects on
JSON lines of its stdout, as `sandbox_harness.py` writes them, or else the last line of a
Python traceback on stderr)."""

from __future__ import annotations

import errno as errno_mod
import json
import re
import signal as signal_mod
from dataclasses import dataclass

from nebula.config import SandboxConfig

WALL_TIMEOUT = "wall_timeout"
CPU_LIMIT = "cpu_limit"
FILE_SIZE_LIMIT = "file_size_limit"
MEMORY_LIMIT = "memory_limit"
TIME_LIMIT = "time_limit"  # a test (or loading the solution) ran past per_test_timeout_s
PROCESS_LIMIT = "process_limit"
NETWORK_BLOCKED = "network_blocked"
WRITE_BLOCKED = "write_blocked"

_NETWORK_ERRNOS = {
    errno_mod.ENETUNREACH, errno_mod.EHOSTUNREACH, errno_mod.ECONNREFUSED,
    errno_mod.EADDRNOTAVAIL, errno_mod.ENETDOWN, errno_mod.EAFNOSUPPORT,
}  # fmt: skip
_NETWORK_TYPES = {
    "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError",
    "gaierror", "herror", "socket.gaierror", "socket.herror",
}  # fmt: skip
_WRITE_ERRNOS = {errno_mod.EROFS, errno_mod.EACCES, errno_mod.EPERM}
_SPACE_ERRNOS = {errno_mod.EFBIG, errno_mod.ENOSPC, errno_mod.EDQUOT}
# Last line of a traceback: "ExcType: message" or a bare "ExcType".
_EXC_LINE = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|gaierror|herror))(?::\s?(?P<msg>.*))?$"
)
_ERRNO_IN_MSG = re.compile(r"\[Errno (-?\d+)\]")


@dataclass
class SandboxResult:
    """How one run ended. `signal` is set when the process was killed by one (for sandboxed
    runs decoded from bubblewrap's 128+N exit status); `exit_code` is None then."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    elapsed_s: float
    violation: str | None = None
    violation_detail: str = ""


def classify_exception(exc_type: str, errno: int | None, message: str = "") -> str | None:
    """Map an exception the untrusted code hit to the limit that caused it, or None."""
    short = exc_type.rsplit(".", 1)[-1]
    if short == "MemoryError":
        return MEMORY_LIMIT
    if short == "TimeoutError" and message == "per-test time limit":  # the harness's alarm
        return TIME_LIMIT
    if errno is None:
        m = _ERRNO_IN_MSG.search(message or "")
        errno = int(m.group(1)) if m else None
    if short == "BlockingIOError" and errno in (None, errno_mod.EAGAIN):
        return PROCESS_LIMIT
    if short == "RuntimeError" and "can't start new thread" in (message or ""):
        return PROCESS_LIMIT
    if exc_type in _NETWORK_TYPES or short in _NETWORK_TYPES:
        return NETWORK_BLOCKED
    if errno in _NETWORK_ERRNOS:
        return NETWORK_BLOCKED
    if errno in _SPACE_ERRNOS:
        return FILE_SIZE_LIMIT
    if errno in _WRITE_ERRNOS or short == "PermissionError":
        return WRITE_BLOCKED
    return None


def _violation_from_report(stdout: bytes) -> tuple[str, str] | None:
    """Structured exceptions on JSON lines of stdout: {"exc": {"type", "errno", "message"}}."""
    for raw in stdout.splitlines():
        raw = raw.strip()
        if not raw.startswith(b"{"):
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        exc = obj.get("exc") if isinstance(obj, dict) else None
        if not isinstance(exc, dict):
            continue
        etype, eno, msg = exc.get("type"), exc.get("errno"), exc.get("message") or ""
        if not isinstance(etype, str):
            continue
        kind = classify_exception(etype, eno if isinstance(eno, int) else None, str(msg))
        if kind:
            return kind, f"{etype}: {msg}"[:300]
    return None


def _violation_from_stderr(stderr: bytes) -> tuple[str, str] | None:
    for line in stderr.decode("utf-8", "replace").splitlines():
        m = _EXC_LINE.match(line.strip())
        if not m:
            continue
        kind = classify_exception(m.group("type"), None, m.group("msg") or "")
        if kind:
            return kind, line.strip()[:300]
    return None


def _signal_name(sig: int) -> str:
    try:
        return signal_mod.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def classify(result: SandboxResult, cfg: SandboxConfig) -> tuple[str | None, str]:
    if result.timed_out:
        return WALL_TIMEOUT, f"killed after the wall-clock limit ({result.elapsed_s:.2f}s)"
    if result.signal == signal_mod.SIGXCPU:
        return CPU_LIMIT, f"CPU time limit of {cfg.cpu_s}s exceeded (SIGXCPU)"
    if result.signal == signal_mod.SIGKILL:
        # We did not send it (not timed out): the RLIMIT_CPU hard limit (soft limit + 1s, when
        # SIGXCPU was ignored) or the kernel's OOM killer.
        return CPU_LIMIT, "killed by SIGKILL (CPU hard limit or out of memory)"
    if result.signal == signal_mod.SIGXFSZ:
        return FILE_SIZE_LIMIT, f"file size limit of {cfg.file_size_mb} MiB exceeded (SIGXFSZ)"
    found = _violation_from_report(result.stdout) or _violation_from_stderr(result.stderr)
    if found:
        return found
    if result.signal is not None:
        return None, f"killed by {_signal_name(result.signal)}"
    return None, ""
