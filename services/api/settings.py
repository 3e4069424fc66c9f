"""Config of the REST job service (`nebula serve --config FILE`), with environment overrides
for the secrets and addresses that deployments set per environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from nebula.config.load import load_file, load_model
from nebula.config.verifier import Strict


class Quota(Strict):
    """What one tenant may run at once; jobs beyond it wait in the tenant's queue."""

    max_concurrent_jobs: int = Field(2, ge=0, description="Jobs starting or running at once "
                                     "(0: nothing ever starts, every job stays queued).")
    cpus: float | None = Field(None, ge=0, description="CPUs of the running jobs together "
                               "(a job needs learner.ranks x num_cpus_per_rank + "
                               "rollout.workers x rollout.num_cpus); none: no limit.")
    gpus: float | None = Field(None, ge=0, description="GPUs of the running jobs together "
                               "(learner.ranks x num_gpus_per_rank + rollout.workers x "
                               "rollout.num_gpus); none: no limit.")


class ApiConfig(Strict):
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    work_dir: str = Field("runs/api", description="Job outputs (relative output_dir of a job "
                          "resolves under work_dir/jobs/<id>), the embedded Redis data and "
                          "the embedded Ray's state.")
    redis_url: str | None = Field(None, description="Redis of job records, events and metrics "
                                  "(persistence on); none starts an embedded one with the "
                                  "append-only file in work_dir/redis. Env: NEBULA_REDIS_URL.")
    job_redis_url: str | None = Field(None, description="The same Redis as jobs on the cluster "
                                      "reach it (default: redis_url).")
    ray_address: str | None = Field(None, description="Ray dashboard/job-submission address "
                                    "(http://HOST:8265) of a cluster; none starts a local Ray "
                                    "head. Env: RAY_ADDRESS.")
    ray_num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded Ray "
                                     "(default: this machine's).")
    ray_object_store_mb: int | None = Field(None, gt=0, description="Object store of the "
                                            "embedded Ray (default: Ray's).")
    job_python: str | None = Field(None, description="Python that runs a job's driver on the "
                                   "cluster (default: this interpreter in embedded mode, "
                                   "`python` on a cluster).")
    tokens: dict[str, str] = Field(default_factory=dict, description="Bearer token -> tenant. "
                                   "Env: NEBULA_API_TOKENS=tok1=tenantA,tok2=tenantB.")
    admin_tokens: list[str] = Field(default_factory=list, description="Tokens that see and "
                                    "manage every tenant's jobs (tenant `admin` for their own "
                                    "jobs). Env: NEBULA_API_ADMIN_TOKENS=tok1,tok2.")
    quotas: dict[str, Quota] = Field(default_factory=dict, description="Tenant -> quota.")
    default_quota: Quota = Field(default_factory=Quota, description="Quota of tenants not in "
                                 "`quotas`.")
    access_log: bool = Field(True, description="Log every request (uvicorn's access log); "
                             "off saves CPU under heavy polling.")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Largest request body (413 above).")
    poll_s: float = Field(2.0, gt=0, description="How often the scheduler checks Ray.")
    submit_retry_s: float = Field(120.0, ge=0, description="How long a job stays `starting` "
                                  "while Ray refuses its submission for a passing reason (no "
                                  "job agent yet, Ray's HTTP server unreachable), retried with "
                                  "backoff; then it fails with the reason.")
    sse_keepalive_s: float = Field(15.0, gt=0, description="Idle time after which an event "
                                   "stream sends a keep-alive comment.")
    stop_local_on_shutdown: bool = Field(True, description="Stop the embedded Ray and Redis "
                                         "when the API stops with no job active (they are "
                                         "kept while jobs run, so an API restart reattaches).")

    def quota(self, tenant: str) -> Quota:
        return self.quotas.get(tenant, self.default_quota)

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir).resolve()


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        token, _, tenant = item.partition("=")
        if token and tenant:
            out[token] = tenant
    return out


def load_api_config(path: str | Path | None = None, **over: Any) -> ApiConfig:
    """The config file (if any), then the environment, then explicit overrides (CLI flags)."""
    cfg = load_file(ApiConfig, path) if path else ApiConfig()
    data = cfg.model_dump()
    env = os.environ
    if env.get("NEBULA_REDIS_URL"):
        data["redis_url"] = env["NEBULA_REDIS_URL"]
    if env.get("RAY_ADDRESS") and not data.get("ray_address"):
        data["ray_address"] = env["RAY_ADDRESS"]
    if env.get("NEBULA_API_TOKENS"):
        data["tokens"] = {**data["tokens"], **_pairs(env["NEBULA_API_TOKENS"])}
    if env.get("NEBULA_API_ADMIN_TOKENS"):
        data["admin_tokens"] = [*data["admin_tokens"],
                                *filter(None, env["NEBULA_API_ADMIN_TOKENS"].split(","))]
    data.update({k: v for k, v in over.items() if v is not None})
    return load_model(ApiConfig, data, source=str(path or "api config"))
