"""Start, watch and stop job processes as Ray jobs (Job Submission API): one Ray job per
attempt of a Nebula job. The same code path serves a configured cluster (RAY_ADDRESS) and
the embedded Ray head that `nebula serve` starts itself."""

from __future__ import annotations

import os
import re
import shlex
import sys
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
