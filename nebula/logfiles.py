"""Where the actors' output goes. The console of `nebula run` is for people (progress and
results); vLLM, Ray and DeepSpeed write hundreds of lines a minute. By default each actor
sends its stdout and stderr (and those of the processes it starts, e.g. vLLM's engine core)
to OUTPUT_DIR/logs/<actor>.log; with `nebula run -v` (NEBULA_VERBOSE=1) they stream to the
console as Ray prints them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOG_DIR_ENV = "NEBULA_LOG_DIR"
VERBOSE_ENV = "NEBULA_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def actor_logs(log_dir: Path) -> None:
    """Driver side: the actors started from now on log under `log_dir` (unless verbose)."""
    if verbose():
        os.environ.pop(LOG_DIR_ENV, None)
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ[LOG_DIR_ENV] = str(log_dir.resolve())


def redirect_to_log_file(name: str) -> None:
    """Actor side, first thing in its constructor: fds 1 and 2 to <log dir>/<name>.log
    (appended: a restarted actor goes on in the same file). No-op without a log dir."""
    d = os.environ.get(LOG_DIR_ENV)
    if not d:
        return
    Path(d).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(d) / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
