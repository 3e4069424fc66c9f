"""Real `nebula serve` processes for the REST API tests (started and stopped by PID), and
cheap job configs.

Every API test module uses the same work dir, so the embedded Ray head that the first
server starts is reattached by the next ones (as after an API restart) instead of started
again; the session's end stops it (and the embedded Redis) by the PIDs in their state files.
Modules whose servers have other quotas bring their own Redis (`module_redis`): a scheduler
admits every queued record of its Redis under its own quotas.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from procs import ROOT, free_port

BASE_CFG: dict[str, Any] = {
    "ray_num_cpus": 8,  # logical CPUs: concurrent test jobs never wait on Ray itself
    "ray_object_store_mb": 256,
    "stop_local_on_shutdown": False,  # the session fixture stops them
    "poll_s": 0.5,
}


class ApiServer:
    def __init__(self, work: Path, cfg: dict[str, Any], name: str) -> None:
        self.work = work
        self.cfg = {**BASE_CFG, **cfg, "work_dir": str(work), "port": free_port()}
        self.url = f"http://127.0.0.1:{self.cfg['port']}"
        self.cfg_path = work / f"api-{name}.yaml"
        self.log_path = work / f"api-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> ApiServer:
        self.work.mkdir(parents=True, exist_ok=True)
        self.cfg_path.write_text(yaml.safe_dump(self.cfg))
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services", "serve", "--config", str(self.cfg_path)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nebula serve exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nebula serve not healthy:\n{self.tail()}")
            time.sleep(0.3)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="session")
def api_work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shared work dir; stops the embedded Ray and Redis at the end of the session."""
    work = tmp_path_factory.getbasetemp() / "nebula-api"
    work.mkdir(exist_ok=True)
    yield work
    from services.jobs.local import LocalRay, LocalRedis

    for daemon in (LocalRay(work / "ray"), LocalRedis(work / "redis")):
        daemon.state = daemon._load() or {}
        daemon.stop()


@contextmanager
def module_redis(tmp: Path) -> Iterator[str]:
    """A persistent (AOF) redis-server of one test module."""
    from nebula.transport.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp, persist=True) as srv:
        yield srv.url


@contextmanager
def api_server(work: Path, cfg: dict[str, Any], name: str) -> Iterator[ApiServer]:
    srv = ApiServer(work, cfg, name).start()
    try:
        yield srv
    finally:
        srv.stop()


def toy_job(tmp: Path, sft_steps: int = 6, grpo_steps: int = 3, **over: Any) -> dict[str, Any]:
    """A short toy job config (hf engine, tiny model) as a dict, data written under tmp."""
    from nebula.tasks.synthetic import make_split

    data = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
    train, held = make_split("addition", tmp / "data", eval_size=100)
    data.pop("output_dir")  # the service places it: work_dir/jobs/<id>
    data["model"]["path"] = str(tmp / "model")
    data["model"]["toy"].update(layers=2)
    data["datasets"]["train"][0]["path"] = str(train)
    data["datasets"]["eval"].update(path=str(held), limit=16)
    data["stages"] = [{"type": "sft", "steps": sft_steps, "batch_size": 16, "lr": 0.003},
                      {"type": "grpo", "steps": grpo_steps}]
    data["rollout"].update(engine="hf", prompts_per_request=4, samples_per_prompt=4)
    data["learner"].update(groups_per_step=2, zero_stage=0)
    data["async"] = {"max_staleness": 1}
    data["eval"] = {"max_prompts": 16}
    data["checkpoint"] = {"keep": 4}
    data.update(over)
    return data


def wait_for(fn: Any, timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every_s)
