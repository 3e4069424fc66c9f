"""Test runner executed INSIDE the code sandbox as `python harness.py` (stdlib only).

Reads a JSON spec on stdin:
  {"mode": "functions" | "stdio", "solution": code, "setup": code,
   "tests": [code, ...]                        (functions mode),
   "cases": [{"input": str, "output": str}]    (stdio mode),
   "per_test_timeout_s": float, "nonce": str}

and writes JSON lines to the stdout it started with (kept on a private fd; user code sees
fd 1/2 pointed elsewhere):
  {"kind": "setup", "ok": false, "error": ..., "exc": {...}, "nonce": ...}  setup/solution failed
  {"kind": "test", "i": 0, "ok": true, "error": "", "exc": null, "nonce": ...}  one per test
  {"kind": "done", "n": N, "nonce": ...}
`exc` is {"type", "errno", "message"} of the exception a test raised, for the sandbox to
classify limits (MemoryError, EAGAIN from fork, blocked connect/write). A result is written as
soon as its test ends, so a run killed midway keeps the results it had; the caller counts every
test without a line as failed (os._exit in user code passes nothing).
"""

import builtins
import io
import json
import os
import signal
import sys

_write = os.write
_dumps = json.dumps
_setitimer = signal.setitimer
_ITIMER_REAL = signal.ITIMER_REAL
_MAX_MSG = 300
_keep = []


class _TestTimeout(BaseException):
    """Raised by SIGALRM when a test runs past its limit (not an Exception, so user code's
    `except Exception` does not swallow it)."""


def _on_alarm(signum, frame):
    raise _TestTimeout()


def _guarded(fn, timeout_s):
    """Run fn() under a per-test alarm; return the exception it raised, or None."""
    try:
        _setitimer(_ITIMER_REAL, max(timeout_s, 0.001))
        try:
            fn()
        finally:
            _setitimer(_ITIMER_REAL, 0)
    except BaseException as e:  # noqa: BLE001 - untrusted code may raise anything
        return e
    return None


def _describe(e, timeout_s):
    """(short error text, structured exc) of an exception, defensively (its __str__ is user
    code too)."""
    if isinstance(e, _TestTimeout):
        return f"timed out after {timeout_s:g}s", {
            "type": "TimeoutError", "errno": None, "message": "per-test time limit"}
    name = "Exception"
    out = {}

    def fill():
        out["name"] = type(e).__name__
        out["msg"] = str(e)[:_MAX_MSG]
        eno = getattr(e, "errno", None) if isinstance(e, OSError) else None
        out["errno"] = eno if isinstance(eno, int) else None

    err = _guarded(fill, 1.0)
    if err is not None:
        return f"{out.get('name', name)} (unprintable)", {
            "type": out.get("name", name), "errno": None, "message": ""}
    name, msg = out["name"], out["msg"]
    if isinstance(e, SystemExit):
        text = f"SystemExit({msg})" if msg else "SystemExit"
    else:
        text = f"{name}: {msg}" if msg else name
    return text[:_MAX_MSG], {"type": name, "errno": out["errno"], "message": msg}


class _Reporter:
    def __init__(self, fd, nonce):
        self.fd = fd
        self.nonce = nonce

    def emit(self, obj):
        obj["nonce"] = self.nonce
        data = (_dumps(obj) + "\n").encode("utf-8", "replace")
        while data:
            try:
                n = _write(self.fd, data)
            except InterruptedError:
                continue
            except OSError:
                return
            data = data[n:]


def _fresh_globals(name):
    return {"__name__": name, "__builtins__": builtins}


def _run_functions(spec, rep, timeout_s):
    tests = spec.get("tests") or []
    g = _fresh_globals("__solution__")
    setup = spec.get("setup") or ""
    solution = spec.get("solution") or ""

    def load():
        if setup:
            exec(compile(setup, "<setup>", "exec"), g)
        exec(compile(solution, "<solution>", "exec"), g)

    err = _guarded(load, timeout_s)
    if err is not None:
        text, exc = _describe(err, timeout_s)
        rep.emit({"kind": "setup", "ok": False, "error": "solution failed to load: " + text,
                  "exc": exc})
        return
    for i, test in enumerate(tests):
        env = dict(g)
        holder = {}

        def one(test=test, env=env):
            holder["code"] = compile(test, f"<test {i}>", "exec")
            exec(holder["code"], env)

        err = _guarded(one, timeout_s)
        if err is None:
            rep.emit({"kind": "test", "i": i, "ok": True, "error": "", "exc": None})
        else:
            text, exc = _describe(err, timeout_s)
            rep.emit({"kind": "test", "i": i, "ok": False, "error": text, "exc": exc})


def _install(path, flags, target):
    """Open `path` as fd `target` (user code may have closed fds 0/1, e.g. via open(0), so
    the new fd can already be the target)."""
    fd = os.open(path, flags, 0o600)
    if fd != target:
        os.dup2(fd, target)
        os.close(fd)


def _tokens(text):
    return text.split()


def _snippet(text, n=80):
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _run_stdio(spec, rep, timeout_s):
    cases = spec.get("cases") or []
    try:
        code = compile(spec.get("solution") or "", "<solution>", "exec")
        setup = spec.get("setup") or ""
        setup_code = compile(setup, "<setup>", "exec") if setup else None
    except BaseException as e:  # noqa: BLE001 - SyntaxError and friends
        text, exc = _describe(e, timeout_s)
        rep.emit({"kind": "setup", "ok": False, "error": "solution failed to compile: " + text,
                  "exc": exc})
        return
    cwd = os.getcwd()
    in_path = os.path.join(cwd, ".nebula_stdin")
    out_path = os.path.join(cwd, ".nebula_stdout")
    for i, case in enumerate(cases):
        given = case.get("input", "")
        expected = case.get("output", "")
        if isinstance(given, list):
            given = "\n".join(map(str, given))
        if isinstance(expected, list):
            expected = "\n".join(map(str, expected))
        given, expected = str(given), str(expected)
        try:
            with open(in_path, "wb") as f:
                f.write(given.encode("utf-8"))
            _install(in_path, os.O_RDONLY, 0)
            _install(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 1)
        except OSError as e:
            text, exc = _describe(e, timeout_s)
            rep.emit({"kind": "test", "i": i, "ok": False, "error": text, "exc": exc})
            continue
        # Both file-backed, so sys.stdin.buffer, open(0), os.read(0) and os.write(1) all work.
        sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                     encoding="utf-8", errors="replace")
        ours = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                encoding="utf-8", errors="replace")
        _keep.append(ours)  # never collected: a late flush must not land in the next case
        _keep.append(sys.stdin)
        sys.stdout = ours
        g = _fresh_globals("__main__")

        def one(g=g):
            if setup_code is not None:
                exec(setup_code, g)
            exec(code, g)

        err = _guarded(one, timeout_s)
        flush_err = _guarded(ours.flush, 1.0)
        if sys.stdout is not ours:
            _guarded(lambda: sys.stdout.flush(), 1.0)
        if err is None and isinstance(flush_err, OSError):
            err = flush_err  # e.g. EFBIG/ENOSPC while flushing buffered output
        if isinstance(err, SystemExit) and err.code in (None, 0):
            err = None
        if err is not None:
            text, exc = _describe(err, timeout_s)
            rep.emit({"kind": "test", "i": i, "ok": False, "error": text, "exc": exc})
            continue
        limit = 4 * len(expected.encode("utf-8")) + (1 << 16)
        try:
            with open(out_path, "rb") as f:
                got_bytes = f.read(limit + 1)
        except OSError as e:
            text, exc = _describe(e, timeout_s)
            rep.emit({"kind": "test", "i": i, "ok": False, "error": text, "exc": exc})
            continue
        if len(got_bytes) > limit:
            rep.emit({"kind": "test", "i": i, "ok": False, "error": "output too long",
                      "exc": None})
            continue
        got = got_bytes.decode("utf-8", "replace")
        if _tokens(got) == _tokens(expected):
            rep.emit({"kind": "test", "i": i, "ok": True, "error": "", "exc": None})
        else:
            rep.emit({"kind": "test", "i": i, "ok": False, "exc": None,
                      "error": f"wrong answer: expected {_snippet(expected)!r}, "
                               f"got {_snippet(got)!r}"})


def main():
    report_fd = os.dup(1)  # non-inheritable: children of user code do not get it
    try:
        spec = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    except BaseException as e:  # noqa: BLE001
        _write(report_fd, (_dumps({"kind": "setup", "ok": False,
                                   "error": f"bad spec: {e}", "exc": None}) + "\n").encode())
        os._exit(2)
    rep = _Reporter(report_fd, str(spec.get("nonce", "")))
    # User code gets an empty stdin and a stdout that goes nowhere; stderr stays the pipe.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                  encoding="utf-8", errors="replace")
    signal.signal(signal.SIGALRM, _on_alarm)
    timeout_s = float(spec.get("per_test_timeout_s") or 4.0)
    mode = spec.get("mode")
    try:
        if mode == "functions":
            _run_functions(spec, rep, timeout_s)
        elif mode == "stdio":
            _run_stdio(spec, rep, timeout_s)
        else:
            rep.emit({"kind": "setup", "ok": False, "error": f"unknown mode {mode!r}",
                      "exc": None})
    except BaseException as e:  # noqa: BLE001 - e.g. a signal user code sent itself
        # Results already written stand; the rest count as failed.
        text, exc = _describe(e, timeout_s)
        rep.emit({"kind": "setup", "ok": False, "error": "harness aborted: " + text,
                  "exc": exc})
    rep.emit({"kind": "done"})
    # Skip interpreter shutdown: user threads, atexit hooks and __del__ do not run or block.
    os._exit(0)


if __name__ == "__main__":
    main()
