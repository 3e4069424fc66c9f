"""The /v1 routes: thin wrappers around JobService and JobStore."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from services.api.auth import Principal, principal
from services.api.body import parse_config_body
from services.api.schemas import (ErrorBody, JobList, JobState, JobView, LogsPage, MetricsPage,
                                  ResumeRequest)
from services.jobs.service import JobService

router = APIRouter(prefix="/v1", tags=["jobs"])
Auth = Annotated[Principal, Depends(principal)]
SEQ = r"^\d{1,20}(-\d{1,20})?$"  # a Redis stream position
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No or unknown token."},
    404: {"model": ErrorBody, "description": "No such job (or another tenant's)."},
}


async def service(request: Request) -> JobService:
    # async: FastAPI runs a sync dependency in a worker thread (a hop per request).
    return request.app.state.service


Svc = Annotated[JobService, Depends(service)]


def _record(svc: JobService, job_id: str, who: Principal) -> None:
    """404 unless the job exists and `who` may see it (one HGET, not the record)."""
    tenant = svc.store.tenant_of(job_id)
    if tenant is None or (who.scope is not None and tenant != who.scope):
        raise HTTPException(404, f"no job {job_id}")


def _json(body: str) -> Response:
    """An answer already encoded by the store. FastAPI neither validates nor re-encodes a
    Response (the route's response_model still documents it in the OpenAPI schema)."""
    return Response(body, media_type="application/json")


def _job_config_body() -> dict[str, Any]:
    """OpenAPI of the create body: a training job's config (JobConfig) or an eval job's
    (EvalJobConfig, `kind: eval`), as JSON or YAML."""
    schema = {"oneOf": [{"$ref": "#/components/schemas/JobConfig"},
                        {"$ref": "#/components/schemas/EvalJobConfig"}]}
    return {"requestBody": {"required": True, "description": "A job config (JobConfig), or "
                            "an eval job's (EvalJobConfig, `kind: eval`).",
                            "content": {"application/json": {"schema": schema},
                                        "application/yaml": {"schema": schema}}}}


@router.post("/jobs", status_code=201, response_model=JobView, openapi_extra=_job_config_body(),
             responses={**ERRORS, 200: {"model": JobView, "description": "An idempotent retry: "
                                        "the job the same Idempotency-Key created."},
                        409: {"model": ErrorBody, "description": "Idempotency-Key reused with "
                              "a different request."},
                        413: {"model": ErrorBody, "description": "Body too large."},
                        422: {"model": ErrorBody, "description": "Invalid config: every bad "
                              "field with its path."}})
async def create_job(request: Request, response: Response, who: Auth, svc: Svc,
                     priority: Annotated[int, Query(ge=-1000, le=1000, description=
                                                    "Higher starts first.")] = 0,
                     idempotency_key: Annotated[str | None, Header(
                         max_length=200, description="A retry with the same key returns the "
                         "same job.")] = None) -> Any:
    import anyio

    body = await request.body()
    raw = parse_config_body(body, request.headers.get("content-type"))
    view, created = await anyio.to_thread.run_sync(
        lambda: svc.submit(who.tenant, raw, priority, idempotency_key, body))
    if not created:
        response.status_code = 200
    return view


def _since(value: str | None) -> str | None:
    from services.jobs.store import valid_stream_id

    if value is not None and not valid_stream_id(value):
        raise HTTPException(422, [{"field": "since", "message": "not a position from a previous "
                                   "answer (next_since or a point's seq)", "type": "value_error"}])
    return value


def _cursor(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(base64.urlsafe_b64decode(value.encode() + b"==").decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(422, [{"field": "cursor", "message": "not a cursor from a "
                                   "previous page", "type": "value_error"}]) from None


@router.get("/jobs", response_model=JobList, responses=ERRORS)
def list_jobs(who: Auth, svc: Svc, state: JobState | None = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query(max_length=40)] = None,
              tenant: Annotated[str | None, Query(max_length=200, description=
                                                  "Admins: only this tenant's jobs.")] = None
              ) -> Any:
    scope = who.scope if who.scope is not None else tenant
    ids, nxt = svc.store.list_ids(scope, state, limit, _cursor(cursor))
    nc = base64.urlsafe_b64encode(str(nxt).encode()).decode().rstrip("=") if nxt else None
    return _json(f'{{"jobs":[{",".join(svc.store.views_json(ids))}],'
                 f'"next_cursor":{json.dumps(nc)}}}')


@router.get("/jobs/{job_id}", response_model=JobView, responses=ERRORS)
def get_job(job_id: str, who: Auth, svc: Svc) -> Any:
    body = svc.store.view_json(job_id, who.scope)
    if body is None:
        raise HTTPException(404, f"no job {job_id}")
    return _json(body)


@router.get("/jobs/{job_id}/metrics", response_model=MetricsPage, responses=ERRORS)
def get_metrics(job_id: str, who: Auth, svc: Svc,
                since: Annotated[str | None, Query(pattern=SEQ)] = None,
                limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> Any:
    _record(svc, job_id, who)
    points, nxt = svc.store.read_metrics(job_id, _since(since), limit)
    return {"points": points, "next_since": nxt}


@router.get("/jobs/{job_id}/logs", response_model=LogsPage, responses=ERRORS)
def get_logs(job_id: str, who: Auth, svc: Svc,
             since: Annotated[str | None, Query(pattern=SEQ)] = None,
             limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> Any:
    _record(svc, job_id, who)
    lines, nxt = svc.store.read_logs(job_id, _since(since), limit)
    return {"lines": lines, "next_since": nxt}


@router.get("/jobs/{job_id}/events", responses={**ERRORS, 200: {
    "description": "Server-Sent Events: state, metrics, log, eval, then end.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    response_class=StreamingResponse)
def job_events(request: Request, job_id: str, who: Auth, svc: Svc,
               last_event_id: Annotated[str | None, Header(max_length=200)] = None) -> Any:
    from services.api.sse import job_events as stream

    _record(svc, job_id, who)
    return StreamingResponse(
        stream(svc.store, request.app.state.aredis, job_id, last_event_id,
               request.app.state.cfg.sse_keepalive_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/jobs/{job_id}/cancel", response_model=JobView, responses=ERRORS)
def cancel_job(job_id: str, who: Auth, svc: Svc) -> Any:
    _record(svc, job_id, who)
    return svc.cancel(job_id)


@router.post("/jobs/{job_id}/resume", response_model=JobView,
             responses={**ERRORS, 409: {"model": ErrorBody, "description": "Not resumable "
                                        "(not failed/cancelled, or no checkpoint)."}})
def resume_job(job_id: str, who: Auth, svc: Svc,
               req: Annotated[ResumeRequest | None, Body()] = None) -> Any:
    _record(svc, job_id, who)
    return svc.resume(job_id, req.checkpoint if req else None)
