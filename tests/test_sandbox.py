"""Tests of the bubblewrap code sandbox: each escape/abuse attempt is stopped and reported
with its violation, the host is unaffected, and a normal run works right after."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
import uuid

import pytest

from nebula.config import SandboxConfig
from nebula.sandbox import Sandbox, SandboxResult, classify_exception

CFG = SandboxConfig(wall_timeout_s=5.0, cpu_s=10, memory_mb=512, max_processes=32, slots=4)
_SB = Sandbox(CFG)
_WHY = _SB.probe()
needs_sandbox = pytest.mark.skipif(_WHY is not None, reason=f"sandbox unavailable: {_WHY}")


async def run(src: str, sb: Sandbox = _SB, wall: float = 5.0, stdin: bytes = b"",
              unsandboxed: bool = False) -> SandboxResult:
    runner = sb.run_unsandboxed if unsandboxed else sb.run
    return await runner({"main.py": src.encode()}, ["python", "main.py"], stdin, wall)


async def assert_normal_run_works(sb: Sandbox = _SB) -> None:
    r = await run("import sys; print(sum(map(int, sys.stdin.read().split())))", sb,
                  stdin=b"2 3 4")
    assert r.exit_code == 0 and r.violation is None, r
    assert r.stdout == b"9\n"


def uid_processes(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:") and int(line.split()[1]) == uid:
                            pids.append(int(entry))
            except OSError:
                pass
    return pids


def sandbox_uids() -> range:
    return range(CFG.uid_base, CFG.uid_base + CFG.slots)


async def assert_no_leftovers() -> None:
    if os.geteuid() != 0:
        return
    for _ in range(20):
        left = [p for u in sandbox_uids() for p in uid_processes(u)]
        if not left:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"sandbox processes left behind: {left}")


@pytest.fixture
def work_parent(monkeypatch: pytest.MonkeyPatch):
    """A private parent for the sandbox's work dirs, so the test can see they are removed."""
    parent = tempfile.mkdtemp(prefix="nebula-sbx-test-")
    os.chmod(parent, 0o711)  # the sandbox uid must reach its own work dir inside
    monkeypatch.setattr(tempfile, "tempdir", parent)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


# --------------------------------------------------------------------------- basics


def test_classify_exception_table() -> None:
    assert classify_exception("MemoryError", None) == "memory_limit"
    assert classify_exception("BlockingIOError", 11) == "process_limit"
    assert classify_exception("RuntimeError", None, "can't start new thread") == "process_limit"
    assert classify_exception("ConnectionRefusedError", 111) == "network_blocked"
    assert classify_exception("OSError", None, "[Errno 101] Network is unreachable") \
        == "network_blocked"
    assert classify_exception("socket.gaierror", -3) == "network_blocked"
    assert classify_exception("OSError", 30) == "write_blocked"
    assert classify_exception("PermissionError", 13) == "write_blocked"
    assert classify_exception("OSError", 27) == "file_size_limit"
    assert classify_exception("ValueError", None, "bad") is None
    assert classify_exception("AssertionError", None) is None


def test_probe_reports_missing_bwrap() -> None:
    sb = Sandbox(SandboxConfig(bwrap="/nonexistent/bwrap"))
    why = sb.probe()
    assert why is not None and "bubblewrap not found" in why
    assert sb.probe() is why  # cached


async def test_run_refuses_without_sandbox() -> None:
    sb = Sandbox(SandboxConfig(bwrap="/nonexistent/bwrap"))
    with pytest.raises(RuntimeError, match="sandbox unavailable"):
        await run("print(1)", sb)


async def test_unsandboxed_run_has_rlimits() -> None:
    sb = Sandbox(SandboxConfig(bwrap="/nonexistent/bwrap", memory_mb=256))
    r = await run("print('hi')", sb, unsandboxed=True)
    assert (r.exit_code, r.stdout, r.violation) == (0, b"hi\n", None)
    r = await run("x = bytearray(1 << 30)", sb, unsandboxed=True)
    assert r.violation == "memory_limit" and r.exit_code == 1


@needs_sandbox
async def test_normal_run_stdout_stderr_exit_code() -> None:
    r = await run("import sys, os\nprint('out')\nprint('err', file=sys.stderr)\n"
                  "print(os.getcwd(), os.environ.get('HOME'))\nsys.exit(3)")
    assert r.exit_code == 3 and r.signal is None and not r.timed_out
    assert r.stdout == b"out\n/tmp/sandbox /tmp/sandbox\n"
    assert r.stderr == b"err\n"
    assert r.violation is None
    await assert_normal_run_works()


@needs_sandbox
async def test_output_truncated_to_max_output_bytes() -> None:
    sb = Sandbox(CFG.model_copy(update={"max_output_bytes": 1000}))
    r = await run("import sys\nsys.stdout.write('x' * 100000)\nsys.stderr.write('y' * 5000)", sb)
    assert r.exit_code == 0
    assert r.stdout == b"x" * 1000 and r.stderr == b"y" * 1000


@needs_sandbox
async def test_environment_is_cleared() -> None:
    os.environ["NEBULA_SECRET_FOR_TEST"] = "s3cret"
    try:
        r = await run("import os; print(sorted(os.environ))")
    finally:
        del os.environ["NEBULA_SECRET_FOR_TEST"]
    assert b"NEBULA_SECRET_FOR_TEST" not in r.stdout
    names = set(eval(r.stdout))
    assert {"HOME", "PATH", "PYTHONDONTWRITEBYTECODE"} <= names
    # LC_CTYPE: Python's own C-locale coercion; PWD: set by bubblewrap's --chdir.
    assert names <= {"HOME", "PATH", "PYTHONDONTWRITEBYTECODE", "LC_CTYPE", "PWD"}


# --------------------------------------------------------------------------- abuse


@needs_sandbox
async def test_infinite_loop_is_killed_at_wall_timeout(work_parent: str) -> None:
    t0 = time.monotonic()
    r = await run("while True:\n    pass", wall=1.0)
    assert time.monotonic() - t0 < 3.0
    assert r.timed_out and r.violation == "wall_timeout"
    assert r.exit_code is None and 0.9 <= r.elapsed_s < 3.0
    assert os.listdir(work_parent) == []
    await assert_no_leftovers()
    await assert_normal_run_works()


@needs_sandbox
async def test_sleeping_child_processes_are_killed_at_wall_timeout() -> None:
    r = await run("import subprocess, time\n"
                  "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
                  "time.sleep(1000)", wall=1.0)
    assert r.violation == "wall_timeout"
    await assert_no_leftovers()
    await assert_normal_run_works()


@needs_sandbox
async def test_cpu_limit() -> None:
    sb = Sandbox(CFG.model_copy(update={"cpu_s": 1}))
    r = await run("while True:\n    pass", sb, wall=8.0)
    assert not r.timed_out
    assert r.violation == "cpu_limit", r
    assert r.elapsed_s < 5.0
    await assert_normal_run_works(sb)


@needs_sandbox
async def test_4gb_allocation_is_refused() -> None:
    r = await run("x = bytearray(4 * 1024**3)\nprint('allocated')")
    assert r.violation == "memory_limit"
    assert r.exit_code == 1 and b"allocated" not in r.stdout
    assert b"MemoryError" in r.stderr
    await assert_normal_run_works()


@needs_sandbox
async def test_network_is_blocked() -> None:
    # A listener on the host's loopback: the sandbox's 127.0.0.1 is its own, so it is refused,
    # and nothing reaches the host.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        # Control: without the sandbox the same code does connect.
        probe = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), "
                 "timeout=2)\nprint('connected')")
        control = await run(probe, unsandboxed=True)
        assert control.stdout == b"connected\n"
        srv.accept()[0].close()

        for host in ("127.0.0.1", "127.0.0.2"):
            r = await run(f"import socket\ns = socket.create_connection(('{host}', {port}), "
                          "timeout=2)\nprint('connected')")
            assert r.violation == "network_blocked", r
            assert b"connected" not in r.stdout
        r = await run("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)")
        assert r.violation == "network_blocked"
        r = await run("import socket\ns = socket.socket()\ns.settimeout(2)\n"
                      "s.connect(('192.0.2.1', 80))")
        assert r.violation == "network_blocked" and b"Network is unreachable" in r.stderr
        r = await run("import socket\nsocket.getaddrinfo('example.com', 80)")
        assert r.violation == "network_blocked"
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing from the sandbox reached the host listener
    finally:
        srv.close()
    await assert_normal_run_works()


@needs_sandbox
async def test_write_to_etc_is_blocked() -> None:
    name = f"/etc/nebula-sandbox-test-{uuid.uuid4().hex}"
    r = await run(f"open({name!r}, 'w').write('pwned')")
    assert r.violation == "write_blocked"
    assert not os.path.exists(name)
    await assert_normal_run_works()


@needs_sandbox
async def test_write_outside_work_dir_is_blocked() -> None:
    for d in ("/var/tmp", "/root", "/usr/lib"):
        name = f"{d}/nebula-sandbox-test-{uuid.uuid4().hex}"
        r = await run(f"open({name!r}, 'w').write('pwned')")
        assert r.violation == "write_blocked", (d, r)
        assert not os.path.exists(name)
    # /tmp inside is a private tmpfs: the write works there but never reaches the host's /tmp.
    name = f"/tmp/nebula-sandbox-test-{uuid.uuid4().hex}"
    r = await run(f"open({name!r}, 'w').write('x')\nprint('ok')")
    assert r.stdout == b"ok\n" and not os.path.exists(name)
    await assert_normal_run_works()


@needs_sandbox
async def test_write_inside_work_dir_works_and_is_removed(work_parent: str) -> None:
    r = await run("import os\nos.mkdir('d')\nopen('d/out.txt', 'w').write('data')\n"
                  "os.chmod('d', 0)\nprint(open('/tmp/sandbox/d/out.txt').read() "
                  "if os.getuid() == 0 else 'data', os.path.realpath('d'))")
    assert r.stdout == b"data /tmp/sandbox/d\n", r
    assert os.listdir(work_parent) == []


@needs_sandbox
async def test_fork_bomb_is_stopped() -> None:
    t0 = time.monotonic()
    r = await run("import os\nwhile True:\n    os.fork()", wall=5.0)
    assert r.violation == "process_limit", r
    assert time.monotonic() - t0 < 5.0
    await assert_no_leftovers()
    await assert_normal_run_works()


@needs_sandbox
async def test_big_file_hits_file_size_limit() -> None:
    sb = Sandbox(CFG.model_copy(update={"file_size_mb": 1}))
    r = await run("open('big', 'wb').write(b'x' * (4 << 20))", sb)
    assert r.violation == "file_size_limit"
    await assert_normal_run_works(sb)


@needs_sandbox
async def test_concurrent_runs_use_distinct_uids_and_respect_slots() -> None:
    if os.geteuid() != 0:
        pytest.skip("uid switching only happens when the service runs as root")
    sb = Sandbox(CFG.model_copy(update={"slots": 3}))
    src = "import os, time\nprint(os.getuid(), os.getgid(), os.getgroups())\ntime.sleep(0.4)"
    t0 = time.monotonic()
    results = await asyncio.gather(*(run(src, sb) for _ in range(6)))
    elapsed = time.monotonic() - t0
    seen = [r.stdout.decode().split(" ", 2) for r in results]
    uids = [int(u) for u, _, _ in seen]
    assert all(int(g) == int(u) and rest.strip() == "[]" for u, g, rest in seen)
    assert set(uids) == {CFG.uid_base, CFG.uid_base + 1, CFG.uid_base + 2}
    # 6 runs through 3 slots: two waves of 0.4 s each.
    assert elapsed >= 0.8
    # The first three ran together, each with its own uid.
    assert len(set(uids[:3])) == 3
    await assert_no_leftovers()


@needs_sandbox
async def test_no_zombies_left_for_the_host_init() -> None:
    """bubblewrap leaves its pid-namespace init orphaned; the sandbox reaps it at once (a
    zombie would count against the slot uid's RLIMIT_NPROC until the host's init reaps it)."""
    if os.geteuid() != 0:
        pytest.skip("runs only switch uids as root")
    sb = Sandbox(CFG.model_copy(update={"slots": 1}))
    for _ in range(5):
        await run("print(1)", sb)
    await run("while True:\n    pass", sb, wall=0.3)
    assert uid_processes(CFG.uid_base) == []


@needs_sandbox
async def test_cancelled_run_is_cleaned_up(work_parent: str) -> None:
    task = asyncio.ensure_future(run("import time\ntime.sleep(100)", wall=30))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_no_leftovers()
    assert os.listdir(work_parent) == []
    await assert_normal_run_works()
