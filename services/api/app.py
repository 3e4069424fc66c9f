"""The REST job service: `create_app(ApiConfig)` for uvicorn (`nebula serve`).

At start it connects to Redis (or starts/reattaches the embedded one), to Ray (RAY_ADDRESS,
or the embedded head it starts/reattaches), reconciles the job records with Ray, and runs
the scheduler. It imports no torch/vLLM: jobs run in their own Ray jobs.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from nebula.config.load import ConfigError
from services.api.body import BodyLimit
from services.api.schemas import Health
from services.api.settings import ApiConfig

log = logging.getLogger("nebula.api")
STATIC = Path(__file__).resolve().parent / "static"


class Stack:
    """Redis, Ray and the job service of one API process."""

    def __init__(self, cfg: ApiConfig) -> None:
        self.cfg = cfg
        self.local: list[Any] = []  # embedded daemons we may stop at shutdown

    def start(self) -> None:
        from services.jobs.launcher import RayLauncher, default_python
        from services.jobs.local import LocalRay, LocalRedis
        from services.jobs.service import JobService
        from services.jobs.store import JobStore

        work = self.cfg.work_path
        work.mkdir(parents=True, exist_ok=True)
        redis_url = self.cfg.redis_url
        if redis_url is None:
            daemon = LocalRedis(work / "redis")
            redis_url = daemon.ensure()["url"]
            self.local.append(daemon)
        self.redis_url = redis_url
        self.store = JobStore.from_url(redis_url)
        self.store.r.ping()
        if self.cfg.redis_url is not None:
            _warn_if_volatile(self.store.r)
        embedded = self.cfg.ray_address is None
        if embedded:
            ray = LocalRay(work / "ray", self.cfg.ray_num_cpus, self.cfg.ray_object_store_mb,
                           cwd=work)
            address = ray.ensure()["dashboard"]
            self.local.append(ray)
            log.info("embedded Ray at %s (%s)", address,
                     "reattached" if ray.reattached else "started")
        else:
            address = self.cfg.ray_address  # type: ignore[assignment]
        self.mode = "embedded" if embedded else "cluster"
        launcher = RayLauncher(address, self.cfg.job_redis_url or redis_url, work,
                               default_python(embedded, self.cfg.job_python), embedded)
        self.service = JobService(self.cfg, self.store, launcher)
        self.service.start()  # reconcile with Ray first, then schedule

    def stop(self) -> None:
        self.service.stop()
        if not self.cfg.stop_local_on_shutdown or not self.local:
            return
        if self.service.launched_jobs():
            # Jobs still run on them: keep both for the next API start to reattach.
            log.warning("leaving the embedded Ray and Redis up for the running jobs")
            return
        for daemon in reversed(self.local):
            daemon.stop()


def _warn_if_volatile(r: Any) -> None:
    """Job records must survive a Redis restart: say so if this one keeps nothing."""
    try:
        conf = {**r.config_get("appendonly"), **r.config_get("save")}
    except Exception:  # noqa: BLE001 - managed Redis may forbid CONFIG
        return
    if conf.get("appendonly") != "yes" and not conf.get("save"):
        log.warning("Redis has neither AOF nor RDB snapshots on: job records are lost if it "
                    "restarts (set appendonly yes)")


def create_app(cfg: ApiConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio
        import redis.asyncio as aredis

        stack = Stack(cfg)
        await anyio.to_thread.run_sync(stack.start)
        app.state.stack = stack
        app.state.service = stack.service
        # The event streams block in XREAD for up to sse_keepalive_s: the socket read
        # timeout must outlast that (redis-py's default of 5 s broke idle streams).
        app.state.aredis = aredis.Redis.from_url(
            stack.redis_url, decode_responses=True, socket_timeout=cfg.sse_keepalive_s + 15,
            socket_connect_timeout=10, health_check_interval=30)
        try:
            yield
        finally:
            await app.state.aredis.aclose()
            await anyio.to_thread.run_sync(stack.stop)

    app = FastAPI(title="Nebula RL job service", version="1", lifespan=lifespan,
                  description="Submit and watch post-training jobs (SFT, GRPO, OPD, MOPD). "
                  "Auth: `Authorization: Bearer <token>` (or `?token=` on GET).")
    app.state.cfg = cfg
    _errors(app)
    from services.api.routes import router

    app.include_router(router)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz(request: Request) -> Any:
        stack = getattr(request.app.state, "stack", None)
        return {"status": "ok", "mode": stack.mode if stack else "embedded"}

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return JSONResponse({"detail": "dashboard not installed; the API is under /v1, "
                                 "its docs at /docs"}, status_code=404)
        return FileResponse(page)

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    _job_config_schema(app)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    return app


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "header", "path"):
        parts = parts[1:] if len(parts) > 1 else parts
    return ".".join(parts) or "<root>"


def _errors(app: FastAPI) -> None:
    from services.jobs.service import Conflict, NotFound

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, exc: ConfigError) -> JSONResponse:
        detail = exc.errors or [{"field": "<root>", "message": str(exc), "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"field": _field(e.get("loc", ())), "message": e.get("msg", ""),
                   "type": e.get("type", "")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": f"no job {exc}"}, status_code=404)

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)


def _job_config_schema(app: FastAPI) -> None:
    """Put JobConfig (and its parts) into the OpenAPI components the create route refers to."""
    from nebula.config.job import JobConfig
    from nebula.evaluation import EvalJobConfig

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        js = JobConfig.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(js.pop("$defs", {}))
        comps["JobConfig"] = js
        ev = EvalJobConfig.model_json_schema(by_alias=True,
                                             ref_template="#/components/schemas/{model}")
        comps.update(ev.pop("$defs", {}))
        comps["EvalJobConfig"] = ev
        # Our 422 bodies list {field, message, type}, not FastAPI's default {loc, msg, type}.
        comps["HTTPValidationError"] = {"$ref": "#/components/schemas/ErrorBody"}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
