"""The README's REST example ("## The job service: REST API, CLI and dashboard", its first
bash block) run as written, from a fresh clone, until the job it submits has `succeeded`.

The fresh clone: `git clone` of this repository (no `runs/`: no data, model, cache or API
state left over), then the working tree's uncommitted changes to tracked files and its
untracked, not ignored files copied over it (deleted files deleted), so the clone holds
what the next commit would. That keeps the test meaningful before and after a commit, and
consistent with the code under test: every `nebula`/`python` here runs this checkout's
packages through the venv's editable install (and the API's job driver gets
PYTHONPATH=this checkout), so the clone only supplies the README, configs and examples.

Each line of the block runs with bash in the clone, in order, with the venv's bin first on
PATH (so `nebula` and `python` are the venv's), except:
- the port: configs/api.yaml serves on 8000, which may be taken on a shared machine, so
  every `8000` becomes a free port and the serve line gets `--port` with it;
- the backgrounded serve line runs in its own process group, stopped (SIGTERM, as `kill %1`
  does) at the end; the Ray head and Redis it started must be gone with it (stopped from
  their state files if not, and the test fails);
- `export` lines set the environment of the later lines;
- JOB_ID becomes the id `nebula submit` printed, and the `cancel ; resume` line is skipped:
  neither applies to a job that has ended;
- `-f` (follow until the job ends) runs under a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from procs import ROOT, free_port

pytestmark = pytest.mark.slow

HEADING = "## The job service"
SUBMIT_TIMEOUT_S = 900


def fresh_clone(dest: Path) -> Path:
    """A clone of HEAD with the working tree's uncommitted (not ignored) changes on it."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)

    def git_files(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode()
        return [f for f in out.split("\0") if f]

    deleted = set(git_files("--deleted"))
    for rel in git_files("--modified", "--others", "--exclude-standard"):
        src, dst = ROOT / rel, dest / rel
        if rel in deleted or not src.is_file():
            dst.unlink(missing_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    assert not (dest / "runs").exists()
    return dest


def readme_block(readme: Path) -> list[str]:
    """The commands of the first ```bash block after the job-service heading."""
    text = readme.read_text()
    start = text.index(HEADING)
    m = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert m, f"no bash block after {HEADING!r}"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def uncomment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line).strip()


def run_line(line: str, cwd: Path, env: dict[str, str], timeout_s: float,
             serve: subprocess.Popen | None = None, serve_log: Path | None = None
             ) -> subprocess.CompletedProcess:
    """Run one line with bash; fails fast if the backgrounded API dies meanwhile."""
    print(f"$ {line}", flush=True)
    out, err = cwd.parent / "line.out", cwd.parent / "line.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=o, stderr=e,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if serve is not None and serve.poll() is not None:
                raise AssertionError(f"nebula serve exited {serve.returncode} during {line!r}:"
                                     f"\n{serve_log.read_text()[-4000:] if serve_log else ''}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s: {line}\n"
                                     f"{out.read_text()[-3000:]}\n{err.read_text()[-3000:]}")
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    res = subprocess.CompletedProcess(line, proc.returncode, out.read_text(), err.read_text())
    print(res.stdout[-3000:], res.stderr[-3000:], sep="\n", flush=True)
    assert res.returncode == 0, f"exit {res.returncode}: {line}\n{res.stdout}\n{res.stderr}"
    return res


def test_readme_rest_block_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path / "clone")
    lines = readme_block(clone / "README.md")
    assert any(ln.startswith("nebula serve") for ln in lines)
    assert any(ln.startswith("nebula submit") for ln in lines)
    port = str(free_port())
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ADDRESS" and not k.startswith("NEBULA_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["COLUMNS"] = "200"  # a terminal wide enough for `nebula jobs` to show whole ids
    serve: subprocess.Popen | None = None
    serve_log = tmp_path / "serve.log"
    job_id = ""
    try:
        for raw in lines:
            line = uncomment(raw).replace("8000", port)
            if line.endswith("&"):  # the API, in the background
                assert line.startswith("nebula serve"), line
                cmd = f"exec {line.rstrip('&').strip()} --port {port}"
                print(f"$ {cmd} &", flush=True)
                with serve_log.open("ab") as log:
                    serve = subprocess.Popen(["bash", "-c", cmd], cwd=clone, env=env,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            elif line.startswith("export "):
                res = run_line(f"{line}\nenv -0", clone, env, 30)
                env = dict(kv.split("=", 1) for kv in res.stdout.split("\0") if "=" in kv)
            elif "JOB_ID" in line:
                if "cancel" in line or "resume" in line:
                    continue
                run_line(line.replace("JOB_ID", job_id), clone, env, 120, serve, serve_log)
            elif line.startswith("nebula submit"):
                assert serve is not None and serve.poll() is None, serve_log.read_text()
                res = run_line(line, clone, env, SUBMIT_TIMEOUT_S, serve, serve_log)
                job_id = res.stdout.split()[0]
            else:
                res = run_line(line, clone, env, 300, serve, serve_log)
                if line.startswith("nebula jobs"):
                    assert job_id and job_id in res.stdout
        assert job_id, "the block submitted no job"
        assert (clone / "runs/data/addition_train.jsonl").is_file()
        with httpx.Client(base_url=env["NEBULA_SERVER"], timeout=30,
                          headers={"Authorization": f"Bearer {env['NEBULA_TOKEN']}"}) as c:
            job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job
        whens = [e["when"] for e in job["evals"]]
        assert "after stage 1 (grpo)" in whens, job["evals"]
        assert all(0.0 <= e["greedy"] <= 1.0 for e in job["evals"])
    finally:
        leftovers = stop_api(serve, clone / "runs" / "api")
    assert not leftovers, f"still running after the API stopped: {leftovers}"


def stop_api(serve: subprocess.Popen | None, work: Path) -> list[str]:
    """SIGTERM the API's process group (as `kill %1`), then stop what it left running of the
    Ray head and Redis it started (each in its own session); returns what it left."""
    import json

    from services.jobs.local import LocalRay, LocalRedis, stop_pid

    daemons = [LocalRay(work / "ray"), LocalRedis(work / "redis")]
    sessions = {}  # daemon name -> its session id (the pid it was started with)
    for d in daemons:
        try:
            sessions[d.name] = int(json.loads(d.state_file.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass
    if serve is not None and serve.poll() is None:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    left = []
    deadline = time.monotonic() + 15
    for d in daemons:
        while d.state_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        if d.state_file.exists():
            left.append(f"{d.name} (state file kept)")
            d.state = json.loads(d.state_file.read_text())
            d.stop()
    for name, sid in sessions.items():
        while in_session(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in in_session(sid):
            left.append(f"{name} session pid {pid}")
            stop_pid(pid, timeout_s=5)
    return left


def in_session(sid: int) -> list[int]:
    """Live processes of session `sid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # After "pid (comm)": state, ppid, pgrp, session, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids
