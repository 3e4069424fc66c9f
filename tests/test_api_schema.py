"""Schemathesis against the served OpenAPI schema of a real `nebula serve`: generated valid
and invalid requests for every operation (examples, coverage, fuzzing and stateful phases)
must never get a server error (5xx).

The token belongs to tenant `fuzz` whose quota is max_concurrent_jobs 0: every job the
fuzzer manages to create stays queued, so no real training job starts. The SSE endpoint is
left out: a queued job's event stream never ends by design (it is tested in test_api.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import api_procs
from api_procs import ApiServer, api_server, module_redis

api_work = api_procs.api_work  # the shared session fixture

TOKEN = "tok-fuzz"


@pytest.fixture(scope="module")
def srv(api_work: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    cfg = {"tokens": {TOKEN: "fuzz"}, "default_quota": {"max_concurrent_jobs": 0},
           "max_body_bytes": 262144}
    with module_redis(tmp_path_factory.mktemp("redis")) as url, \
            api_server(api_work, {**cfg, "redis_url": url}, "schema") as s:
        yield s


def test_schemathesis_finds_no_server_errors(srv: ApiServer, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "schemathesis"
    if not exe.exists():
        pytest.skip("schemathesis is not installed (pip install -e .[dev])")
    cmd = [str(exe), "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
           "-H", f"Authorization: Bearer {TOKEN}", "--exclude-path-regex", "/events$",
           "--max-examples", "20", "--max-time", "60", "--seed", "1", "--workers", "1", "--no-shrink",
           "--request-timeout", "20", "--no-color",
           "--generation-database", "none", "--report", "junit",
           "--report-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:] + "\n--- server log ---\n" + srv.tail()
    assert "Server error" not in out and "500" not in out.split("Summary")[-1].split("\n")[0]
