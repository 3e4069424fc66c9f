"""Run untrusted code under bubblewrap with rlimits and an unprivileged uid.

Layers of isolation of `Sandbox.run` (what each one stops):
- bubblewrap `--unshare-all`: no network (its own loopback only), own pid/ipc/uts namespaces,
  the host filesystem read-only (`--ro-bind / /`), a private size-capped tmpfs on /tmp and
  /dev/shm, and a private work dir bound on /tmp/sandbox, the only host path it may write.
- rlimits set before exec: CPU seconds, address space (memory), processes (per uid, so fork
  bombs stop), file size, no core dumps.
- when the service runs as root: the run drops to uid/gid `uid_base + slot` with no
  supplementary groups; root would ignore RLIMIT_NPROC and distinct slots keep concurrent runs
  from sharing one process budget.
- the whole process group (and bubblewrap, whose `--die-with-parent` takes the pid namespace
  with it) is SIGKILLed at the wall-clock limit; the work dir is always removed.

`run_unsandboxed` keeps only the rlimits (for `sandbox.allow_unsandboxed` and as the
baseline when measuring the sandbox's overhead).

Why a run stopped (the limit it hit) is worked out in `limits.py`; killing and
reaping the processes of a run is in `procs.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal as signal_mod
import subprocess
import tempfile
import threading
import time

from nebula.config import SandboxConfig
from nebula.sandbox.limits import SandboxResult, classify
from nebula.sandbox.procs import (
    become_subreaper,
    feed,
    kill_group,
    read_capped,
    read_child_pid,
    reap,
    reap_sync,
)

SANDBOX_DIR = "/tmp/sandbox"
_SANDBOX_PATH = "/usr/bin:/bin"


def _count_uid_tasks(uid: int) -> int:
    """Threads (what RLIMIT_NPROC counts) owned by `uid` right now."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                text = f.read()
        except OSError:
            continue
        ruid = threads = None
        for line in text.splitlines():
            if line.startswith(b"Uid:"):
                ruid = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
        if ruid == uid:
            total += threads or 1
    return total


class Sandbox:
    """Runs untrusted programs; at most `cfg.slots` at once, each as its own uid (as root)."""

    def __init__(self, cfg: SandboxConfig | None = None) -> None:
        self.cfg = cfg or SandboxConfig()
        self._probe_result: str | None = None
        self._probed = False
        self._probe_lock = threading.Lock()
        self._free_slots = list(range(self.cfg.slots))
        self._slots_lock = threading.Lock()
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ setup

    @property
    def is_root(self) -> bool:
        return os.geteuid() == 0

    def _uid(self, slot: int) -> int | None:
        return self.cfg.uid_base + slot if self.is_root else None

    def _bwrap_path(self) -> str | None:
        b = self.cfg.bwrap
        if os.sep in b:
            return b if os.path.isfile(b) and os.access(b, os.X_OK) else None
        return shutil.which(b)

    def _python(self, argv: list[str]) -> list[str]:
        if not argv:
            raise ValueError("argv is empty")
        return [self.cfg.python, *argv[1:]] if argv[0] == "python" else list(argv)

    def _bwrap_argv(
        self, bwrap: str, work: str, argv: list[str], info_fd: int | None = None
    ) -> list[str]:
        tmp_bytes = str(max(4 * self.cfg.file_size_mb, 64) << 20)
        shm_bytes = str(max(self.cfg.file_size_mb, 16) << 20)
        info = ["--info-fd", str(info_fd)] if info_fd is not None else []
        return [
            bwrap, *info, "--unshare-all", "--die-with-parent", "--new-session",
            "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
            "--size", tmp_bytes, "--tmpfs", "/tmp",
            "--size", shm_bytes, "--tmpfs", "/dev/shm",
            "--bind", work, SANDBOX_DIR, "--chdir", SANDBOX_DIR,
            "--clearenv", "--setenv", "PATH", _SANDBOX_PATH, "--setenv", "HOME", SANDBOX_DIR,
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--", *argv,
        ]  # fmt: skip

    def _popen_kwargs(self, uid: int | None) -> dict:
        """setsid, rlimits and (as root) the drop to `uid`, applied in the child before exec.

        The uid/gid/groups switch and setsid use Popen's own (async-signal-safe) options, which
        run in the forked child just before `preexec_fn`; the rlimits are then lowered as the
        unprivileged uid (lowering needs no privilege)."""
        cfg = self.cfg
        if uid is None and os.geteuid() != 0:
            # Not root: RLIMIT_NPROC counts every thread of our own uid, so leave room for them.
            nproc = _count_uid_tasks(os.getuid()) + cfg.max_processes
        else:
            nproc = cfg.max_processes
        limits = [
            (resource.RLIMIT_CPU, cfg.cpu_s, cfg.cpu_s + 1),
            (resource.RLIMIT_AS, cfg.memory_mb << 20, cfg.memory_mb << 20),
            (resource.RLIMIT_NPROC, nproc, nproc),
            (resource.RLIMIT_FSIZE, cfg.file_size_mb << 20, cfg.file_size_mb << 20),
            (resource.RLIMIT_CORE, 0, 0),
        ]

        def preexec() -> None:  # runs in the child between fork and exec
            for what, soft, hard in limits:
                _, cur_hard = resource.getrlimit(what)
                if cur_hard != resource.RLIM_INFINITY:
                    hard = min(hard, cur_hard)
                    soft = min(soft, hard)
                resource.setrlimit(what, (soft, hard))

        kw: dict = {"start_new_session": True, "preexec_fn": preexec, "close_fds": True}
        if uid is not None:
            kw.update(user=uid, group=uid, extra_groups=[])
        return kw

    def probe(self) -> str | None:
        """None when an isolated sandbox works here, else why not (cached)."""
        with self._probe_lock:
            if not self._probed:
                self._probe_result = self._probe()
                self._probed = True
            return self._probe_result

    async def aprobe(self) -> str | None:
        if self._probed:
            return self._probe_result
        return await asyncio.to_thread(self.probe)

    def _probe(self) -> str | None:
        bwrap = self._bwrap_path()
        if bwrap is None:
            return f"bubblewrap not found ({self.cfg.bwrap!r}); install the `bubblewrap` package"
        if not (os.path.isfile(self.cfg.python) and os.access(self.cfg.python, os.X_OK)):
            return f"sandbox interpreter {self.cfg.python!r} not found"
        uid = self._uid(0)
        work = self._make_work_dir(uid)
        become_subreaper()
        r, w = os.pipe()
        try:
            argv = self._bwrap_argv(bwrap, work, [self.cfg.python, "-c", "pass"], info_fd=w)
            try:
                p = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                    env={"PATH": _SANDBOX_PATH}, pass_fds=(w,), **self._popen_kwargs(uid),
                )  # fmt: skip
            except (OSError, subprocess.SubprocessError) as e:
                return f"bubblewrap could not be started: {e}"
            finally:
                os.close(w)
                reap_sync(read_child_pid(r))
            if p.returncode != 0:
                err = p.stderr.decode("utf-8", "replace").strip()[-300:]
                who = f" as uid {uid}" if uid is not None else ""
                return f"bubblewrap test run{who} failed (exit {p.returncode}): {err}"
            return None
        finally:
            os.close(r)
            self._remove_work_dir(work)

    # ------------------------------------------------------------------ slots

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.cfg.slots), loop
        return self._sem

    @contextlib.asynccontextmanager
    async def _slot(self):
        async with self._semaphore():
            while True:
                with self._slots_lock:
                    slot = self._free_slots.pop(0) if self._free_slots else None
                if slot is not None:
                    break
                # Only when runs from another event loop still hold slots.
                await asyncio.sleep(0.01)
            try:
                yield slot
            finally:
                with self._slots_lock:
                    self._free_slots.append(slot)

    # ------------------------------------------------------------------ work dir

    @staticmethod
    def _make_work_dir(uid: int | None) -> str:
        work = tempfile.mkdtemp(prefix="nebula-sbx-")
        if uid is not None:
            os.chown(work, uid, uid)
        return work

    @staticmethod
    def _write_files(work: str, files: dict[str, bytes], uid: int | None) -> None:
        root = os.path.realpath(work)
        for name, data in files.items():
            path = os.path.realpath(os.path.join(root, name))
            if os.path.isabs(name) or not path.startswith(root + os.sep):
                raise ValueError(f"sandbox file name must be relative and inside: {name!r}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            if uid is not None:
                os.chown(path, uid, uid)

    @staticmethod
    def _remove_work_dir(work: str) -> None:
        def fix(func, path, _exc) -> None:  # a dir the code made unreadable/unwritable
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(path), 0o700)
                os.chmod(path, 0o700)
                func(path)

        shutil.rmtree(work, onerror=fix)
        if os.path.exists(work):
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ running

    async def run(
        self, files: dict[str, bytes], argv: list[str], stdin: bytes, wall_timeout_s: float
    ) -> SandboxResult:
        """Run `argv` in a fresh sandbox holding `files` in its working directory."""
        why = await self.aprobe()
        if why is not None:
            raise RuntimeError(f"code sandbox unavailable: {why}")
        bwrap = self._bwrap_path()
        assert bwrap is not None
        async with self._slot() as slot:
            uid = self._uid(slot)
            return await self._execute(files, argv, stdin, wall_timeout_s, uid, bwrap)

    async def run_unsandboxed(
        self, files: dict[str, bytes], argv: list[str], stdin: bytes, wall_timeout_s: float
    ) -> SandboxResult:
        """The same run with rlimits only: no namespaces, no uid switch. Unsafe for
        untrusted code."""
        async with self._slot():
            return await self._execute(files, argv, stdin, wall_timeout_s, None, None)

    async def _execute(
        self,
        files: dict[str, bytes],
        argv: list[str],
        stdin: bytes,
        wall_timeout_s: float,
        uid: int | None,
        bwrap: str | None,
    ) -> SandboxResult:
        argv = self._python(argv)
        work = self._make_work_dir(uid)
        try:
            self._write_files(work, files, uid)
            if bwrap is not None:
                result = await self._spawn_sandboxed(bwrap, work, argv, stdin, wall_timeout_s,
                                                     uid)
            else:
                env = {"PATH": _SANDBOX_PATH, "HOME": work, "PYTHONDONTWRITEBYTECODE": "1"}
                result = await self._spawn(argv, work, env, stdin, wall_timeout_s, uid, None)
        finally:
            await asyncio.to_thread(self._remove_work_dir, work)
        result.violation, result.violation_detail = classify(result, self.cfg)
        return result

    async def _spawn_sandboxed(
        self, bwrap: str, work: str, argv: list[str], stdin: bytes, wall_timeout_s: float,
        uid: int | None,
    ) -> SandboxResult:
        """bubblewrap reports its pid-namespace init on --info-fd. bwrap exits without reaping
        that process, so it is orphaned: we are its subreaper and reap it ourselves (left to
        the host's init it would linger as a zombie counting against the uid's RLIMIT_NPROC,
        and a container whose pid 1 never reaps would exhaust it)."""
        have_reaper = become_subreaper()
        r, w = os.pipe()
        info = {"fd": r, "pid": None, "reapable": have_reaper}
        try:
            cmd = self._bwrap_argv(bwrap, work, argv, info_fd=w)
            try:
                return await self._spawn(cmd, None, {"PATH": _SANDBOX_PATH}, stdin,
                                         wall_timeout_s, uid, info, pass_fds=(w,))
            finally:
                if info["pid"] is None:
                    info["pid"] = read_child_pid(r)
                if have_reaper and info["pid"] is not None:
                    await reap(info["pid"])
        finally:
            if not info.get("w_closed"):
                os.close(w)
            os.close(r)

    async def _spawn(
        self,
        cmd: list[str],
        cwd: str | None,
        env: dict[str, str],
        stdin: bytes,
        wall_timeout_s: float,
        uid: int | None,
        info: dict | None,
        pass_fds: tuple[int, ...] = (),
    ) -> SandboxResult:
        """Start `cmd`, feed stdin, collect capped output, enforce the wall clock. `info` is
        the bubblewrap bookkeeping of a sandboxed run (None for an unsandboxed one)."""
        cap = self.cfg.max_output_bytes
        sandboxed = info is not None
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=cwd, env=env, pass_fds=pass_fds,
            **self._popen_kwargs(uid),
        )  # fmt: skip
        for fd in pass_fds:  # the child has its copy; EOF on the info pipe needs ours closed
            os.close(fd)
        if info is not None:
            info["w_closed"] = True

        def kill() -> None:
            if info is not None and info["reapable"]:
                # The sandbox's init, first: its death tears down the whole pid namespace.
                if info["pid"] is None:
                    info["pid"] = read_child_pid(info["fd"])
                if info["pid"] is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(info["pid"], signal_mod.SIGKILL)
            kill_group(proc)

        out_task = asyncio.ensure_future(read_capped(proc.stdout, cap))
        err_task = asyncio.ensure_future(read_capped(proc.stderr, cap))
        in_task = asyncio.ensure_future(feed(proc.stdin, stdin))
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout=max(wall_timeout_s, 0.001))
            except asyncio.TimeoutError:
                timed_out = True
                kill()
                await proc.wait()
        except BaseException:  # cancelled: never leave the process behind
            kill()
            with contextlib.suppress(BaseException):
                await asyncio.shield(proc.wait())
            for t in (out_task, err_task, in_task):
                t.cancel()
            raise
        if not sandboxed:
            # Children left in the group: without a pid namespace nothing else ends them. (A
            # group id is not reused while a member lives; with none left this is a no-op.)
            kill_group(proc)
        elapsed = time.monotonic() - start
        in_task.cancel()
        # The pipes close when the last holder dies; a survivor holding them (possible only
        # without the pid namespace) must not hang us.
        done, pending = await asyncio.wait({out_task, err_task}, timeout=1.0)
        for t in pending:
            t.cancel()
        stdout = out_task.result() if out_task in done else b""
        stderr = err_task.result() if err_task in done else b""
        with contextlib.suppress(BaseException):
            await in_task
        rc = proc.returncode
        exit_code, sig = rc, None
        if rc is not None and rc < 0:
            exit_code, sig = None, -rc
        elif sandboxed and rc is not None and 128 < rc <= 128 + 64 and not timed_out:
            # bubblewrap reports a child killed by signal N as exit status 128 + N.
            exit_code, sig = None, rc - 128
        if timed_out:
            exit_code, sig = None, signal_mod.SIGKILL
        return SandboxResult(exit_code, sig, stdout, stderr, timed_out, elapsed)
