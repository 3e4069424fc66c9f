"""REST job service benchmark on loopback: a real `nebula serve` (uvicorn, one process)
with a real Redis and its embedded Ray head, loaded by N concurrent clients in this process.

Setup: 3 tenants, each with a token and a quota of max_concurrent_jobs 0, so every submitted
job stays queued and nothing trains; each tenant gets `--seed-jobs` jobs first.

0. Calibration: GET /healthz (no Redis, no auth) closed loop at N clients for 5 s, the
   ceiling of this HTTP stack plus load generator on this machine.
1. Status reads at 200 clients, the target scenario: N clients (default 200) for `--seconds`,
   each in a loop GET /v1/jobs/{id} (3 of 4 requests) or GET /v1/jobs?limit=20 (1 of 4) of
   its tenant, pausing a random 0.5-1.5 x `--think-ms` (default 1000 ms: each client polls
   about once a second, as a dashboard or `nebula status --follow` does) between requests.
2. The same reads closed loop (no pause): the server saturated. Latency is then about
   N / throughput (Little's law), so this phase shows the capacity, not a target latency.
3. Submits: `--submit-clients` clients POST /v1/jobs (a full toy JobConfig, JSON) closed
   loop for `--submit-seconds`.

Latency is measured in the client from send to the full body read; p50/p99 and requests/s
per phase. The machine running this has few cores: the load generator competes with the
server (and the idle Ray head) for them, which both caps requests/s and adds client-side
queueing to the latencies; the load average is printed before and after. Last line:
`api p99_ms=<ms> rps=<n>` (phase 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nebula.service_process import free_port  # noqa: E402
from nebula.transport.redis_server import EmbeddedRedis  # noqa: E402
from services.jobs.local import stop_pid  # noqa: E402

TENANTS = ["acme", "globex", "initech"]


def job_config(name: str) -> dict[str, Any]:
    """The toy recipe as a job body (it is validated, queued and never started)."""
    data = yaml.safe_load((ROOT / "examples/toy/addition.yaml").read_text())
    data["name"] = name
    data.pop("output_dir", None)
    from services.sdk import resolve_paths

    return resolve_paths(data, ROOT)  # the service refuses relative input paths


class Server:
    def __init__(self, work: Path, redis_url: str) -> None:
        self.work = work
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tokens = {f"tok-{t}": t for t in TENANTS}
        cfg = {"host": "127.0.0.1", "port": self.port, "work_dir": str(work / "api"),
               "redis_url": redis_url, "tokens": self.tokens,
               "default_quota": {"max_concurrent_jobs": 0}, "ray_num_cpus": 2,
               "access_log": False}  # one log line per request costs the server CPU
        (work / "api.json").write_text(json.dumps(cfg))

    def __enter__(self) -> Server:
        self.log = (self.work / "server.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services", "serve", "--config",
                                      str(self.work / "api.json")], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nebula serve exited with {self.proc.returncode}:\n"
                                   + (self.work / "server.log").read_text()[-3000:])
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("nebula serve not healthy after 300 s")
            time.sleep(0.5)

    def __exit__(self, *exc: Any) -> None:
        stop_pid(self.proc.pid, 60.0)
        self.log.close()
        ray_state = self.work / "api" / "ray" / "ray.json"
        if ray_state.exists():  # left up by the server: stop it by its PID
            stop_pid(int(json.loads(ray_state.read_text())["pid"]), 60.0)


def loadavg() -> str:
    """1, 5 and 15 minute load averages (other work on this machine shows up here)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def report(name: str, lat: list[float], errors: int, seconds: float, clients: int) -> dict[str, float]:
    out = {"p50_ms": pct(lat, 0.50) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
           "max_ms": max(lat, default=float("nan")) * 1e3, "rps": len(lat) / seconds,
           "n": len(lat), "errors": errors}
    print(f"{name}: clients={clients} n={out['n']} errors={errors} p50={out['p50_ms']:.1f}ms "
          f"p99={out['p99_ms']:.1f}ms max={out['max_ms']:.1f}ms rps={out['rps']:.0f}", flush=True)
    return out


async def run_phase(base: str, clients: int, seconds: float, make_request: Any,
                    think_s: float = 0.0, warmup_s: float = 1.0) -> tuple[list[float], int, float]:
    """`clients` tasks loop `await make_request(session, i, rng)` -> (status, body) until the
    time is up; latencies of requests started after the warm-up are kept. One aiohttp
    session with a connection per client (httpx's pool collapses at this concurrency: at 200
    clients it held /healthz to ~30 requests/s on this 2-core machine, aiohttp ~600)."""
    import aiohttp

    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    async with aiohttp.ClientSession(base, connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        t_measure = time.perf_counter() + warmup_s
        t_end = t_measure + seconds

        async def client(i: int) -> None:
            nonlocal errors
            rng = random.Random(i)
            await asyncio.sleep(rng.random() * min(warmup_s, 0.5))  # stagger the start
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    ok = await make_request(http, i, rng) < 400
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                t1 = time.perf_counter()
                if t0 >= t_measure:
                    if ok:
                        lat.append(t1 - t0)
                    else:
                        errors += 1
                if think_s:
                    await asyncio.sleep(think_s * (0.5 + rng.random()))

        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - t_measure
    return lat, errors, max(elapsed, seconds)


async def main_async(a: argparse.Namespace, srv: Server) -> dict[str, float]:
    tokens = list(srv.tokens)
    headers = {t: {"Authorization": f"Bearer {t}"} for t in tokens}
    jobs: dict[str, list[str]] = {t: [] for t in tokens}
    async with httpx.AsyncClient(base_url=srv.base, timeout=60) as http:
        for t in tokens:
            for k in range(a.seed_jobs):
                res = await http.post("/v1/jobs", json=job_config(f"seed-{k}"), headers=headers[t])
                res.raise_for_status()
                jobs[t].append(res.json()["id"])
    print(f"seeded {a.seed_jobs} queued jobs for each of {len(tokens)} tenants", flush=True)

    async def fetch(http: Any, method: str, path: str, **kw: Any) -> int:
        async with http.request(method, path, **kw) as res:
            await res.read()
            return res.status

    async def status(http: Any, i: int, rng: random.Random) -> int:
        tok = tokens[i % len(tokens)]
        if rng.random() < 0.25:
            return await fetch(http, "GET", "/v1/jobs", params={"limit": "20"}, headers=headers[tok])
        return await fetch(http, "GET", f"/v1/jobs/{rng.choice(jobs[tok])}", headers=headers[tok])

    body = json.dumps(job_config("bench-submit")).encode()

    async def submit(http: Any, i: int, rng: random.Random) -> int:
        tok = tokens[i % len(tokens)]
        return await fetch(http, "POST", "/v1/jobs", data=body, headers={
            **headers[tok], "Content-Type": "application/json"})

    async def health(http: Any, i: int, rng: random.Random) -> int:
        return await fetch(http, "GET", "/healthz")

    lat, err, secs = await run_phase(srv.base, a.clients, 5.0, health)
    report("0. GET /healthz, closed loop", lat, err, secs, a.clients)
    what = "status reads (GET /v1/jobs/{id} 75%, GET /v1/jobs 25%)"
    lat, err, secs = await run_phase(srv.base, a.clients, a.seconds, status, a.think_ms / 1e3)
    reads = report(f"1. {what}, think {a.think_ms:.0f} ms", lat, err, secs, a.clients)
    lat, err, secs = await run_phase(srv.base, a.clients, a.seconds, status)
    report(f"2. {what}, closed loop", lat, err, secs, a.clients)
    lat, err, secs = await run_phase(srv.base, a.submit_clients, a.submit_seconds, submit)
    report("3. submits (POST /v1/jobs), closed loop", lat, err, secs, a.submit_clients)
    return reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--think-ms", type=float, default=1000.0,
                    help="mean pause of a phase-1 client between requests")
    ap.add_argument("--submit-clients", type=int, default=20)
    ap.add_argument("--submit-seconds", type=float, default=5.0)
    ap.add_argument("--seed-jobs", type=int, default=100,
                    help="queued jobs per tenant (status reads must not slow down with them)")
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(f"cpus={os.cpu_count()} (load generator, server and Ray head share them) "
          f"loadavg={loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nebula-bench-api-") as tmp:
        work = Path(tmp)
        with EmbeddedRedis(work / "redis") as redis_srv, Server(work, redis_srv.url) as srv:
            reads = asyncio.run(main_async(a, srv))
    print(f"loadavg={loadavg()}")
    print(f"api p99_ms={reads['p99_ms']:.1f} rps={reads['rps']:.0f}")


if __name__ == "__main__":
    main()
