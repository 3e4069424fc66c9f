"""Response and request bodies of the REST API (they make the OpenAPI schema precise)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobState = Literal["queued", "starting", "running", "succeeded", "failed", "cancelled"]


class Checkpoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str = Field(description="Directory of the checkpoint (resume_from accepts it).")
    tag: str = Field(description="Its name under the job's checkpoint dir.")
    kind: Literal["checkpoint", "export"] = Field(
        "checkpoint", description="checkpoint: learner state (resumable); export: the final "
        "Hugging Face model.")
    time: float | None = Field(None, description="When it was written (unix seconds).")


class JobView(BaseModel):
    id: str
    name: str
    tenant: str
    state: JobState
    priority: int
    queue_position: int | None = Field(
        None, description="1-based position in the tenant's queue while queued.")
    stage: str | None = Field(None, description="Current stage, e.g. sft0, grpo1.")
    step: int = Field(0, description="Step within the current stage.")
    total_steps: int | None = Field(None, description="Steps of the current stage.")
    policy_version: int | None = Field(None, description="Latest published policy version.")
    latest_metrics: dict[str, Any] = Field(default_factory=dict,
                                           description="The newest metrics point.")
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    evals: list[dict[str, Any]] = Field(
        default_factory=list, description="Held-out evaluations: when, version, greedy, "
        "sampled accuracy (and by domain).")
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    attempt: int = Field(0, description="How often the job was resumed.")
    config: dict[str, Any] = Field(description="The job config, defaults filled in.")


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class MetricsPoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    seq: str = Field(description="Position in the series; pass as `since` to continue.")
    time: float | None = None
    stage: str | None = None
    step: int | None = None


class MetricsPage(BaseModel):
    points: list[MetricsPoint]
    next_since: str | None


class LogsPage(BaseModel):
    lines: list[str]
    next_since: str | None


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="Path or tag of one of the job's "
                                   "checkpoints (default: the latest).")


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the bad field, e.g. stages.0.sft.steps.")
    message: str
    type: str


class ErrorBody(BaseModel):
    detail: str | list[FieldError] | list[dict[str, Any]]


class Health(BaseModel):
    status: Literal["ok"]
    mode: Literal["embedded", "cluster"]
