"""Python client of the Nebula REST job service (what the `nebula` CLI uses).

    from services.sdk import NebulaClient
    with NebulaClient("http://127.0.0.1:8000", token="...") as c:
        job = c.submit("examples/toy/addition.yaml")
        for event, data in c.events(job["id"]):
            ...

Relative paths in a submitted config resolve on the server (under its work dir).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"


class ApiError(RuntimeError):
    """A non-2xx answer; `detail` is the server's (for 422: a list of {field, message})."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        if isinstance(detail, list):
            text = "; ".join(f"{d.get('field')}: {d.get('message')}" if isinstance(d, dict)
                             else str(d) for d in detail)
        else:
            text = str(detail)
        super().__init__(f"HTTP {status}: {text}")


class NebulaClient:
    def __init__(self, server: str | None = None, token: str | None = None,
                 timeout: float = 30.0) -> None:
        self.server = (server or os.environ.get("NEBULA_SERVER") or DEFAULT_SERVER).rstrip("/")
        token = token or os.environ.get("NEBULA_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def __enter__(self) -> NebulaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r.json()

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, config: dict[str, Any] | str | Path, priority: int = 0,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Create a job from a config dict or a YAML/JSON file; returns its JobView. Relative
        input paths (model, datasets, teachers, resume_from) are made absolute against this
        process's working directory first, as `nebula run` would read them."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if isinstance(config, dict):
            body, ctype = json.dumps(resolve_paths(config)).encode(), "application/json"
        else:
            from nebula.config.load import ConfigError, parse_text

            p = Path(config)
            body = p.read_bytes()
            ctype = "application/json" if p.suffix == ".json" else "application/yaml"
            try:
                data = parse_text(body.decode(), "json" if p.suffix == ".json" else None)
            except (ConfigError, UnicodeDecodeError):
                data = None  # sent as it is: the service's 422 says what is wrong
            if isinstance(data, dict):
                body, ctype = json.dumps(resolve_paths(data)).encode(), "application/json"
        return self._call("POST", "/v1/jobs", content=body, params={"priority": priority},
                          headers={**headers, "Content-Type": ctype})

    def list(self, state: str | None = None, limit: int = 50,
             cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if cursor:
            params["cursor"] = cursor
        return self._call("GET", "/v1/jobs", params=params)

    def iter_jobs(self, state: str | None = None, page: int = 100) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            res = self.list(state, page, cursor)
            yield from res["jobs"]
            cursor = res["next_cursor"]
            if not cursor:
                return

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def metrics(self, job_id: str, since: str | None = None, limit: int = 1000) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"since": since} if since else {})}
        return self._call("GET", f"/v1/jobs/{job_id}/metrics", params=params)

    def logs(self, job_id: str, since: str | None = None, limit: int = 1000) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"since": since} if since else {})}
        return self._call("GET", f"/v1/jobs/{job_id}/logs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def resume(self, job_id: str, checkpoint: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/resume",
                          json={"checkpoint": checkpoint} if checkpoint else None)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    # -- live events ----------------------------------------------------------------------

    def events(self, job_id: str, last_event_id: str | None = None,
               reconnect: bool = True) -> Iterator[tuple[str, Any]]:
        """(event type, data) from the job's SSE stream until its `end` event; reconnects
        with Last-Event-ID if the connection drops."""
        last = last_event_id
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(30.0, read=60.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise ApiError(r.status_code, r.json().get("detail", r.text))
                    for kind, data, eid in _parse_sse(r.iter_lines()):
                        last = eid or last
                        yield kind, data
                        if kind == "end":
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                if not reconnect:
                    raise
            if not reconnect:
                return

    def follow_logs(self, job_id: str) -> Iterator[str]:
        for kind, data in self.events(job_id):
            if kind == "log":
                yield data["line"]


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Any, str | None]]:
    kind, data, eid = "message", [], None
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield kind, value, eid
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            eid = value


def resolve_paths(config: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """`config` with its relative input paths absolute against `base` (default: the working
    directory). A config that does not validate is sent as it is: the service's 422 names
    the bad fields."""
    from nebula.config import ConfigError, load_model
    from nebula.config.job import JobConfig
    from nebula.config.paths import resolve_input_paths
    from nebula.evaluation import EvalJobConfig, is_eval_config

    try:
        cfg = load_model(EvalJobConfig if is_eval_config(config) else JobConfig,
                         dict(config), source="job config")
    except ConfigError:
        return config
    out = resolve_input_paths(config, cfg, base or Path.cwd())
    bm = out.get("base_model")  # an eval job's learner-checkpoint base (EvalJobConfig)
    if isinstance(bm, str) and bm and not Path(bm).is_absolute():
        out["base_model"] = str(((base or Path.cwd()) / bm).resolve())
    return out
