"""Start, watch and stop job processes as Ray jobs (Job Submission API): one Ray job per
attempt of a Nebula job. The same code path serves a configured cluster (RAY_ADDRESS) and
the embedded Ray head that `nebula serve` starts itself."""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RayStatus:
    status: str | None  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED; None: no such Ray job
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.status in (None, "STOPPED", "SUCCEEDED", "FAILED")


class RayLauncher:
    def __init__(self, address: str, redis_url: str, work_dir: Path, python: str,
                 embedded: bool, gcs_address: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.client = JobSubmissionClient(address)
        self.redis_url = redis_url
        self.work_dir = work_dir
        self.python = python
        self.embedded = embedded
        self.gcs_address = gcs_address
        self._capacity: tuple[float, dict[str, float]] | None = None  # (when, totals)

    @staticmethod
    def ray_job_id(job_id: str, attempt: int) -> str:
        # Ray keeps submission ids forever: a resumed job is a new Ray job.
        return job_id if attempt == 0 else f"{job_id}-a{attempt}"

    def submit(self, job_id: str, attempt: int) -> str:
        sid = self.ray_job_id(job_id, attempt)
        cmd = [self.python, "-m", "services.jobs.process", "--job-id", job_id,
               "--redis-url", self.redis_url, "--work-dir", str(self.work_dir)]
        env = {
            # Cancel sends SIGTERM; give the job time to stop its actors and services.
            "RAY_JOB_STOP_WAIT_TIME_S": "20",
            "PYTHONUNBUFFERED": "1",
        }
        if self.embedded:
            # The job's driver runs this checkout with this interpreter, on this machine.
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
            env["RAY_AUTH_MODE"] = "disabled"
        self.client.submit_job(entrypoint=shlex.join(cmd), submission_id=sid,
                               runtime_env={"env_vars": env},
                               metadata={"nebula_job_id": job_id, "attempt": str(attempt)})
        return sid

    @staticmethod
    def retryable(e: BaseException) -> bool:
        """A submission error that passes: the head has no job agent yet (right after it
        started), or its HTTP server is unreachable, overloaded or timed out."""
        text = str(e)
        if "No available agent" in text or "try again later" in text:
            return True
        if re.search(r"status code (502|503|504)\b", text):
            return True
        # requests' ConnectionError and Timeout are OSErrors (IOError).
        return isinstance(e, (OSError, TimeoutError))

    @staticmethod
    def already_submitted(e: BaseException) -> bool:
        return "already exists" in str(e)

    def capacity(self, max_age_s: float = 10.0) -> dict[str, float] | None:
        """The total resources of the Ray cluster when they bound what a job can ever get,
        else None. Known for the embedded Ray head: one node this API started, no autoscaler
        (summed over its alive nodes from the dashboard's state API, `GET /api/v0/nodes`,
        the listing `ray list nodes` reads). None on a configured cluster, whose present
        total is no limit (an autoscaler may add nodes), and when the dashboard does not
        answer (the job is queued as before)."""
        if not self.embedded:
            return None
        now = time.monotonic()
        if self._capacity and now - self._capacity[0] < max_age_s:
            return self._capacity[1]
        import httpx

        try:
            r = httpx.get(f"{self.address.rstrip('/')}/api/v0/nodes",
                          params={"limit": 10000}, timeout=10)
            r.raise_for_status()
            nodes = r.json()["data"]["result"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        total: dict[str, float] = {}
        for node in nodes:
            if node.get("state") == "ALIVE":
                for k, v in (node.get("resources_total") or {}).items():
                    total[k] = total.get(k, 0.0) + float(v)
        if not total:
            return None  # no alive node listed yet: no bound to check against
        self._capacity = (now, total)
        return total

    def status(self, ray_job_id: str) -> RayStatus:
        try:
            info = self.client.get_job_info(ray_job_id)
        except RuntimeError as e:  # the client raises RuntimeError on HTTP 404
            if "does not exist" in str(e) or "404" in str(e):
                return RayStatus(None, f"Ray has no job {ray_job_id} (was the Ray cluster "
                                 "restarted?)")
            raise
        return RayStatus(str(info.status.value if hasattr(info.status, "value") else info.status),
                         info.message or "")

    def stop(self, ray_job_id: str) -> None:
        try:
            self.client.stop_job(ray_job_id)
        except RuntimeError:
            pass  # already gone

    def logs_tail(self, ray_job_id: str, chars: int = 4000) -> str:
        try:
            return self.client.get_job_logs(ray_job_id)[-chars:]
        except Exception:  # noqa: BLE001 - best effort, for error messages only
            return ""


def default_python(embedded: bool, configured: str | None) -> str:
    return configured or (sys.executable if embedded else "python")
