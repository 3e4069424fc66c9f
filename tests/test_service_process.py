"""The embedded default's child services (redis-server, the verifier service) do not outlive
the process that started them, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from nebula.transport.redis_server import EmbeddedRedis
    from verifier.launch import verifier_process

    work = Path(sys.argv[1])
    redis = EmbeddedRedis(work / "redis").start()
    with verifier_process(work / "verifier", {"port": 0, "metrics_port": None}) as srv:
        print(redis.proc.pid, srv["proc"].pid, flush=True)
        time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its new parent) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_children_die_when_the_driver_is_killed(tmp_path: Path) -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = driver.stdout.readline() if driver.stdout else ""
        assert line, "the driver did not start its services"
        children = [int(p) for p in line.split()]
        assert all(_alive(p) for p in children)
        driver.send_signal(signal.SIGKILL)  # no cleanup code runs
        driver.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in children if _alive(p)]
        for p in left:  # end what this test started, then fail
            os.kill(p, signal.SIGKILL)
        assert not left, f"children {left} outlived their killed parent"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
