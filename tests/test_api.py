"""The REST job service against a real `nebula serve` (uvicorn) with its embedded Redis and
Ray: auth and tenant isolation, idempotent create, bad input (422/404/413, nothing written),
listing, cancel, and quota queueing with real (cancelled) toy jobs.

Most tenants here have max_concurrent_jobs 0, so their jobs stay queued and cost nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

import api_procs
from api_procs import ApiServer, api_server, module_redis, toy_job, wait_for

api_work = api_procs.api_work  # the shared session fixture

TOKENS = {"tok-a": "alice", "tok-b": "bob", "tok-q": "quota", "tok-p": "pager"}
ADMIN = "tok-admin"
SSE_KEEPALIVE_S = 6.0


@pytest.fixture(scope="module")
def srv(api_work: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    cfg = {"tokens": TOKENS, "admin_tokens": [ADMIN], "max_body_bytes": 65536,
           # Above redis-py's default 5 s socket timeout, which once broke idle streams.
           "sse_keepalive_s": SSE_KEEPALIVE_S,
           "default_quota": {"max_concurrent_jobs": 0},
           "quotas": {"quota": {"max_concurrent_jobs": 1, "cpus": 4}}}
    with module_redis(tmp_path_factory.mktemp("redis")) as url, \
            api_server(api_work, {**cfg, "redis_url": url}, "api") as s:
        yield s


@pytest.fixture(scope="module")
def job_cfg(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return toy_job(tmp_path_factory.mktemp("toyjob"), sft_steps=5000)


def create(c: httpx.Client, cfg: dict[str, Any], **kw: Any) -> httpx.Response:
    return c.post("/v1/jobs", json=cfg, **kw)


def tenant_jobs(c: httpx.Client) -> list[dict[str, Any]]:
    r = c.get("/v1/jobs", params={"limit": 200})
    assert r.status_code == 200
    return r.json()["jobs"]


def test_health_openapi_docs_and_dashboard(srv: ApiServer) -> None:
    with srv.client(None) as c:
        assert c.get("/healthz").json() == {"status": "ok", "mode": "embedded"}
        spec = c.get("/openapi.json").json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events"} <= set(spec["paths"])
        assert "JobConfig" in spec["components"]["schemas"]
        assert c.get("/docs").status_code == 200
        assert c.get("/").status_code in (200, 404)  # the dashboard page, once installed


def test_auth(srv: ApiServer, job_cfg: dict[str, Any]) -> None:
    with srv.client(None) as anon, srv.client("nope") as bad:
        assert anon.get("/v1/jobs").status_code == 401
        assert bad.get("/v1/jobs").status_code == 401
        assert create(anon, job_cfg).status_code == 401
        assert anon.post("/v1/jobs", json=job_cfg, params={"token": "tok-a"}).status_code == 401
        r = anon.get("/v1/jobs", params={"token": "tok-a"})  # GET (EventSource) may use ?token=
        assert r.status_code == 200


def test_tenant_isolation_and_admin(srv: ApiServer, job_cfg: dict[str, Any]) -> None:
    with srv.client("tok-a") as a, srv.client("tok-b") as b, srv.client(ADMIN) as admin:
        ja = create(a, job_cfg).json()
        jb = create(b, job_cfg).json()
        assert ja["tenant"] == "alice" and jb["tenant"] == "bob"
        assert ja["state"] == "queued" and ja["queue_position"] >= 1
        for path in ("", "/metrics", "/logs", "/events"):
            assert b.get(f"/v1/jobs/{ja['id']}{path}").status_code == 404
        assert b.post(f"/v1/jobs/{ja['id']}/cancel").status_code == 404
        assert b.post(f"/v1/jobs/{ja['id']}/resume").status_code == 404
        assert ja["id"] not in {j["id"] for j in tenant_jobs(b)}
        assert a.get(f"/v1/jobs/{ja['id']}").json()["id"] == ja["id"]
        # The pre-encoded answers are what the OpenAPI schema says.
        from services.api.schemas import JobList, JobView

        JobView.model_validate(a.get(f"/v1/jobs/{ja['id']}").json())
        JobList.model_validate(admin.get("/v1/jobs", params={"limit": 200}).json())
        seen = {j["id"] for j in tenant_jobs(admin)}
        assert {ja["id"], jb["id"]} <= seen
        assert admin.get(f"/v1/jobs/{jb['id']}").status_code == 200
        only_b = admin.get("/v1/jobs", params={"tenant": "bob", "limit": 200}).json()["jobs"]
        assert {j["tenant"] for j in only_b} == {"bob"}
        assert admin.post(f"/v1/jobs/{jb['id']}/cancel").json()["state"] == "cancelled"


def test_idempotent_create(srv: ApiServer, job_cfg: dict[str, Any]) -> None:
    with srv.client("tok-a") as a, srv.client("tok-b") as b:
        before = len(tenant_jobs(a))
        r1 = create(a, job_cfg, headers={"Idempotency-Key": "k-1"})
        r2 = create(a, job_cfg, headers={"Idempotency-Key": "k-1"})
        assert (r1.status_code, r2.status_code) == (201, 200)
        assert r1.json()["id"] == r2.json()["id"]
        assert len(tenant_jobs(a)) == before + 1
        other = dict(job_cfg, name="other")
        r3 = create(a, other, headers={"Idempotency-Key": "k-1"})
        assert r3.status_code == 409 and "Idempotency-Key" in r3.json()["detail"]
        rb = create(b, job_cfg, headers={"Idempotency-Key": "k-1"})  # keys are per tenant
        assert rb.status_code == 201 and rb.json()["id"] != r1.json()["id"]


def test_yaml_body_and_priority(srv: ApiServer, job_cfg: dict[str, Any]) -> None:
    with srv.client("tok-a") as a:
        r = a.post("/v1/jobs", content=yaml.safe_dump(job_cfg),
                   headers={"Content-Type": "application/yaml"}, params={"priority": 7})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["priority"] == 7 and job["config"]["name"] == job_cfg["name"]
        assert job["config"]["output_dir"].endswith(f"jobs/{job['id']}")
        # priority 7 goes ahead of alice's priority-0 jobs
        assert job["queue_position"] == 1


def test_invalid_config_names_each_field_and_writes_nothing(srv: ApiServer,
                                                            job_cfg: dict[str, Any]) -> None:
    bad = json.loads(json.dumps(job_cfg))
    bad["name"] = "bad name!"
    bad["stages"][0]["steps"] = -1
    bad["rollout"]["workers"] = "many"
    bad["learner"]["typo_field"] = 1
    with srv.client("tok-a") as a:
        before = len(tenant_jobs(a))
        r = create(a, bad, headers={"Idempotency-Key": "bad-then-good"})
        assert r.status_code == 422
        fields = {e["field"] for e in r.json()["detail"]}
        assert {"name", "stages.0.sft.steps", "rollout.workers", "learner.typo_field"} <= fields, fields
        for body, ctype in ((b"name: [unclosed", "application/yaml"), (b"{nope", "application/json"),
                            (b"", "application/json"), (b"- 1\n- 2\n", "application/yaml"),
                            (b"\xff\xfe", "application/json")):
            r = a.post("/v1/jobs", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 422, (body, r.text)
            assert r.json()["detail"][0]["field"]
        assert a.post("/v1/jobs", json=job_cfg, params={"priority": "high"}).status_code == 422
        assert len(tenant_jobs(a)) == before  # nothing half-created
        # the key of a rejected request is not used up
        assert create(a, job_cfg, headers={"Idempotency-Key": "bad-then-good"}).status_code == 201


def test_quota_that_can_never_fit_is_422(srv: ApiServer, job_cfg: dict[str, Any]) -> None:
    big = json.loads(json.dumps(job_cfg))
    big["rollout"]["workers"] = 4  # 1 + 4 CPUs > the tenant's 4
    with srv.client("tok-q") as q:
        r = create(q, big)
        assert r.status_code == 422 and "CPUs" in r.json()["detail"][0]["message"]


def test_inputs_it_can_see_are_checked_at_submission(srv: ApiServer, job_cfg: dict[str, Any],
                                                      tmp_path: Path) -> None:
    """The embedded service shares its jobs' filesystem: a missing dataset or a held-out row
    without the answer its verifier needs is a 422 naming the field, and nothing is queued."""
    bad = json.loads(json.dumps(job_cfg))
    gone = tmp_path / "typo_train.jsonl"
    bad["datasets"]["train"][0]["path"] = str(gone)
    held = tmp_path / "held.jsonl"
    held.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2="}\n')
    bad["datasets"]["eval"]["path"] = str(held)
    with srv.client("tok-a") as a:
        before = len(tenant_jobs(a))
        r = create(a, bad)
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == [
            {"field": "datasets.train.0.path", "type": "missing_path",
             "message": f"dataset file not found: {gone}"},
            {"field": "datasets.eval.reference_field", "type": "dataset_row",
             "message": f"{held} row 1: missing reference field 'answer', which verifier "
                        "'exact' needs"}], r.json()
        assert len(tenant_jobs(a)) == before


def test_unknown_job_is_404(srv: ApiServer) -> None:
    with srv.client("tok-a") as a, srv.client(ADMIN) as admin:
        for c in (a, admin):
            for path in ("", "/metrics", "/logs", "/events"):
                assert c.get(f"/v1/jobs/jdoesnotexist{path}").status_code == 404
            assert c.post("/v1/jobs/jdoesnotexist/cancel").status_code == 404
            assert c.post("/v1/jobs/jdoesnotexist/resume").status_code == 404


def test_oversize_body_is_413(srv: ApiServer, job_cfg: dict[str, Any]) -> None:
    padded = dict(job_cfg, name="x" * 70000)
    with srv.client("tok-a") as a:
        before = len(tenant_jobs(a))
        assert create(a, padded).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: capped while streaming
            body = json.dumps(padded).encode()
            for i in range(0, len(body), 8192):
                yield body[i:i + 8192]

        r = a.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert len(tenant_jobs(a)) == before


def test_listing_state_filter_and_paging(srv: ApiServer, job_cfg: dict[str, Any]) -> None:
    with srv.client("tok-p") as p:
        ids = [create(p, job_cfg).json()["id"] for _ in range(5)]
        for i in ids[:2]:
            assert p.post(f"/v1/jobs/{i}/cancel").json()["state"] == "cancelled"
        seen, cursor, pages = [], None, 0
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            res = p.get("/v1/jobs", params=params).json()
            seen += [j["id"] for j in res["jobs"]]
            pages += 1
            cursor = res["next_cursor"]
            if not cursor:
                break
        assert seen == ids[::-1] and pages == 3  # newest first, 2 + 2 + 1
        queued = p.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]
        assert [j["id"] for j in queued] == ids[:1:-1]
        assert [j["queue_position"] for j in queued] == [3, 2, 1]
        cancelled = p.get("/v1/jobs", params={"state": "cancelled", "limit": 1}).json()
        assert [j["id"] for j in cancelled["jobs"]] == [ids[1]] and cancelled["next_cursor"]
        assert p.get("/v1/jobs", params={"state": "bogus"}).status_code == 422
        assert p.get("/v1/jobs", params={"cursor": "!!"}).status_code == 422


def test_cancelled_job_events_logs_and_resume(srv: ApiServer, job_cfg: dict[str, Any]) -> None:
    with srv.client("tok-a") as a:
        job = create(a, job_cfg).json()
        assert a.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
        again = a.post(f"/v1/jobs/{job['id']}/cancel").json()  # idempotent
        assert again["state"] == "cancelled" and again["finished_at"]
        events = []
        with a.stream("GET", f"/v1/jobs/{job['id']}/events", params={"token": "tok-a"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
        assert events[0] == "state" and events[-1] == "end" and "log" in events
        logs = a.get(f"/v1/jobs/{job['id']}/logs").json()
        assert any("cancelled" in line for line in logs["lines"]) and logs["next_since"]
        assert a.get(f"/v1/jobs/{job['id']}/logs", params={"since": logs["next_since"]}
                     ).json()["lines"] == []
        assert a.get(f"/v1/jobs/{job['id']}/metrics").json() == {"points": [], "next_since": None}
        assert a.get(f"/v1/jobs/{job['id']}/metrics", params={"since": "x"}).status_code == 422
        r = a.post(f"/v1/jobs/{job['id']}/resume")  # no checkpoint was written
        assert r.status_code == 409 and "checkpoint" in r.json()["detail"]
        r = a.post(f"/v1/jobs/{job['id']}/resume", json={"checkpoint": "/etc"})
        assert r.status_code == 422


def all_log_lines(client: Any, job_id: str) -> list[str]:
    """Every line of the job's log, page after page."""
    lines: list[str] = []
    since: str | None = None
    while True:
        page = client.get(f"/v1/jobs/{job_id}/logs",
                          params={"since": since} if since else None).json()
        lines += page["lines"]
        if not page["lines"]:
            return lines
        since = page["next_since"]


def test_quota_queueing_priority_and_cancel_frees_capacity(srv: ApiServer,
                                                           job_cfg: dict[str, Any]) -> None:
    """Tenant `quota` runs one job at a time: the rest wait in priority, then FIFO order,
    with their positions; cancelling the running job starts the next one (real Ray jobs)."""
    with srv.client("tok-q") as q:
        first = create(q, job_cfg).json()
        assert first["state"] in ("starting", "running")
        second = create(q, job_cfg).json()
        assert (second["state"], second["queue_position"]) == ("queued", 1)
        urgent = create(q, job_cfg, params={"priority": 10}).json()
        assert (urgent["state"], urgent["queue_position"]) == ("queued", 1)
        assert q.get(f"/v1/jobs/{second['id']}").json()["queue_position"] == 2
        wait_for(lambda: q.get(f"/v1/jobs/{first['id']}").json()["state"] == "running", 120,
                 "the first job to run")
        assert q.post(f"/v1/jobs/{first['id']}/cancel").json()["state"] == "cancelled"
        assert q.get(f"/v1/jobs/{urgent['id']}").json()["state"] in ("starting", "running")
        assert q.get(f"/v1/jobs/{second['id']}").json()["queue_position"] == 1
        assert q.post(f"/v1/jobs/{urgent['id']}/cancel").json()["state"] == "cancelled"
        assert q.get(f"/v1/jobs/{second['id']}").json()["state"] in ("starting", "running")
        assert q.post(f"/v1/jobs/{second['id']}/cancel").json()["state"] == "cancelled"
        # The cancelled driver got SIGTERM and said so in the job's log.
        wait_for(lambda: any(f"job {first['id']} cancelled" in x
                             for x in all_log_lines(q, first["id"])), 60, "the cancel in the log")
        for j in (first, urgent, second):
            assert q.get(f"/v1/jobs/{j['id']}").json()["state"] == "cancelled"


def test_cli_against_the_api(srv: ApiServer, job_cfg: dict[str, Any], tmp_path: Path) -> None:
    """`nebula submit / jobs / status / logs / cancel` through the SDK."""
    import os
    import subprocess
    import sys

    from procs import ROOT

    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(job_cfg))
    env = {**os.environ, "NEBULA_SERVER": srv.url, "NEBULA_TOKEN": "tok-b", "COLUMNS": "200"}

    def nebula(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    sub = nebula("submit", str(cfg_file), "--idempotency-key", "cli-1")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert nebula("submit", str(cfg_file), "--idempotency-key", "cli-1").stdout.strip() == job_id
    listed = [json.loads(x) for x in nebula("jobs", "--json", "--state", "queued").stdout.splitlines()]
    assert job_id in {j["id"] for j in listed}
    table = nebula("jobs")
    assert table.returncode == 0 and job_id in table.stdout
    st = nebula("status", job_id)
    assert st.returncode == 0 and "queued" in st.stdout and job_id in st.stdout
    assert nebula("cancel", job_id).stdout.strip() == f"{job_id}: cancelled"
    assert "cancelled by user" in nebula("logs", job_id).stdout
    assert "cancelled by user" in nebula("logs", job_id, "-f").stdout  # ends: job is terminal
    missing = nebula("status", "jnope")
    assert missing.returncode == 1 and "404" in missing.stderr
    bad = nebula("status", job_id, "--token", "wrong")
    assert bad.returncode == 1 and "401" in bad.stderr


def test_idle_event_stream_stays_open_across_keepalives(srv: ApiServer,
                                                        job_cfg: dict[str, Any]) -> None:
    """A queued job's stream sends nothing but keep-alives: it must stay open (each one is a
    blocking XREAD longer than redis-py's default socket timeout) with no server error."""
    import time

    with srv.client("tok-a") as a:
        job = create(a, job_cfg).json()
        assert job["state"] == "queued"
        keepalives, kinds = 0, []
        t0 = time.monotonic()
        with a.stream("GET", f"/v1/jobs/{job['id']}/events",
                      timeout=SSE_KEEPALIVE_S * 3) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kinds.append(line[7:])
                if line.startswith(": keep-alive"):
                    keepalives += 1
                    if keepalives == 3:
                        break
        assert time.monotonic() - t0 >= 2.5 * SSE_KEEPALIVE_S
        assert kinds and set(kinds) == {"state"}  # current state, then its history
        assert a.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    log = srv.tail(200_000)
    assert "Exception in ASGI application" not in log and "Timeout reading" not in log, log[-3000:]
