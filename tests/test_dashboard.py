"""The dashboard at `/`, in headless Chromium against the real job service: `nebula serve`
(embedded Ray, a real Redis) running a short toy job. The job row renders, the loss curve
gains points from the SSE stream while the job runs, the reward and accuracy curves fill
in, the eval table shows each eval record (pass@k, per-domain rows) and the stage table each
configured stage's progress, and screenshots are saved under artifacts/dashboard/ (and the
test's tmp dir)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from procs import ROOT, free_port
from services.jobs.local import stop_pid

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
TOKEN = "dash-token"
ARTIFACTS = ROOT / "artifacts" / "dashboard"
TERMINAL = {"succeeded", "failed", "cancelled"}


def _need_browser() -> None:
    """Set-up installs Chromium (as root) and playwright (dev extra). Under CI (`CI=true`) a
    missing one fails the test: a clean CI run must exercise the dashboard; elsewhere (a
    developer machine without root) it skips, saying what is missing."""
    import importlib.util

    missing = None
    if not os.access(CHROMIUM, os.X_OK):
        missing = f"no Chromium at {CHROMIUM} (Debian package `chromium`; scripts/setup.sh " \
                  "installs it when run as root)"
    elif importlib.util.find_spec("playwright") is None:
        missing = "the `playwright` package is not installed (the dev extra has it)"
    if missing and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(missing)
    if missing:
        pytest.skip(missing)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[dict[str, Any]]:
    """`python -m services serve` on loopback with one tenant token and an embedded Ray."""
    _need_browser()
    tmp = tmp_path_factory.mktemp("dashboard-api")
    port = free_port()
    cfg = {"host": "127.0.0.1", "port": port, "work_dir": str(tmp / "work"),
           "redis_url": redis_url, "tokens": {TOKEN: "team-a"}, "ray_num_cpus": 4,
           "poll_s": 1.0}
    (tmp / "api.json").write_text(json.dumps(cfg))
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services", "serve", "--config",
                             str(tmp / "api.json")], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    srv = {"base": base, "headers": {"Authorization": f"Bearer {TOKEN}"}, "log": tmp / "server.log"}
    try:
        deadline = time.monotonic() + 240  # the embedded Ray head takes a while on 2 cores
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nebula serve exited with {proc.returncode}:\n"
                                   f"{srv['log'].read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("nebula serve not healthy after 240 s:\n"
                                   f"{srv['log'].read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield srv
    finally:
        try:  # cancel what still runs, so the server stops its embedded Ray on exit
            with httpx.Client(base_url=base, headers=srv["headers"], timeout=10) as c:
                for job in c.get("/v1/jobs").json()["jobs"]:
                    if job["state"] not in TERMINAL:
                        c.post(f"/v1/jobs/{job['id']}/cancel")
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        stop_pid(proc.pid, 60.0)
        log.close()
        ray_state = tmp / "work" / "ray" / "ray.json"
        if ray_state.exists():  # left up by the server (a job still active): stop it by PID
            stop_pid(int(json.loads(ray_state.read_text())["pid"]), 60.0)


def _job(srv: dict[str, Any], job_id: str) -> dict[str, Any]:
    return httpx.get(f"{srv['base']}/v1/jobs/{job_id}", headers=srv["headers"], timeout=10).json()


def _why(srv: dict[str, Any], job_id: str) -> str:
    job = _job(srv, job_id)
    logs = httpx.get(f"{srv['base']}/v1/jobs/{job_id}/logs", headers=srv["headers"],
                     params={"limit": 10000}, timeout=10).json().get("lines", [])
    return (f"job state={job.get('state')} error={job.get('error')}\nlast log lines:\n"
            + "\n".join(logs[-40:]))


def _points(page: Any, chart: str) -> int:
    return int(page.get_attribute(f"#chart-{chart}", "data-points") or 0)


def _pct(v: Any) -> str:
    """A fraction as the dashboard shows it: JavaScript's (v * 100).toFixed(1) + "%" (the
    exact value of the double v * 100 rounded half up, as toFixed does)."""
    if not isinstance(v, (int, float)):
        return "–"
    return f"{Decimal(v * 100).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"


def _two_domains(held: Path) -> list[str]:
    """Tag the held-out prompts by answer length (sums with a carry into the hundreds or
    not), so each eval record has a per-domain breakdown of two domains."""
    rows = [json.loads(line) for line in held.read_text().splitlines() if line.strip()]
    for r in rows:
        r["domain"] = "add-3digit" if len(r["answer"]) == 3 else "add-2digit"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sorted({r["domain"] for r in rows[:40]})


def _shot(page: Any, tmp: Path, name: str) -> Path:
    path = tmp / name
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return ARTIFACTS / name


def test_dashboard_lists_jobs_and_draws_live_curves(server: dict[str, Any], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright
    from test_e2e import toy_config

    base = server["base"]
    cfg = toy_config(tmp_path, rollout={"engine": "hf"}, name="dashboard-toy",
                     eval={"k": [1, 2]})
    assert cfg.datasets.eval is not None and cfg.eval.samples >= 2
    domains = _two_domains(Path(cfg.datasets.eval.path))
    assert len(domains) == 2, domains
    stages = [(f"{st.type}{i}", st.type, st.steps) for i, st in enumerate(cfg.stages)]
    assert [(t, n) for _, t, n in stages] == [("sft", 20), ("grpo", 4)]
    res = httpx.post(f"{base}/v1/jobs", headers=server["headers"], timeout=30,
                     json=cfg.model_dump(mode="json", by_alias=True))
    assert res.status_code == 201, res.text
    job_id = res.json()["id"]

    errors: list[str] = []
    foreign: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: foreign.append(r.url)
                    if not r.url.startswith((base, "data:")) else None)
            page.goto(f"{base}/?token={TOKEN}")

            # Every asset comes from the package: nothing outside the server is fetched.
            assets = page.eval_on_selector_all(
                "script[src], link[href]", "els => els.map(e => e.getAttribute('src') || e.getAttribute('href'))")
            assert assets and all(a.startswith(("/static/", "data:")) for a in assets), assets

            # The job list renders the submitted job, and the token left the address bar.
            row = page.wait_for_selector(f'tr[data-job-id="{job_id}"]', timeout=30_000)
            assert "dashboard-toy" in row.inner_text() and "team-a" in row.inner_text()
            assert "token=" not in page.url
            assert page.evaluate("localStorage.getItem('nebula.token')") == TOKEN
            # Record every change of the curves' point counts with the job state shown at
            # that moment (the SFT stage takes only seconds: polling from here would miss it).
            page.evaluate("""() => {
                window.__growth = [];
                for (const id of ['chart-loss', 'chart-throughput']) {
                    const c = document.getElementById(id);
                    new MutationObserver((records) => window.__growth.push(...records.map(
                        (r) => ({ chart: id, before: +r.oldValue, points: +c.dataset.points,
                                  state: document.getElementById('job-state').textContent }))))
                        .observe(c, { attributes: true, attributeOldValue: true,
                                      attributeFilter: ['data-points'] });
                }
                // Each change of the stage table and of the eval table, with the job state.
                window.__stages = [];
                window.__evals = [];
                const state = () => document.getElementById('job-state').textContent;
                new MutationObserver(() => window.__stages.push({ state: state(), rows:
                    [...document.querySelectorAll('#stages tbody tr')].map((tr) => ({
                        ...tr.dataset }))}))
                    .observe(document.querySelector('#stages tbody'), { subtree: true,
                        childList: true, attributes: true,
                        attributeFilter: ['data-done', 'data-phase'] });
                new MutationObserver(() => window.__evals.push({ state: state(),
                    rows: document.querySelectorAll('#evals tbody tr.eval').length }))
                    .observe(document.querySelector('#evals tbody'), { childList: true });
            }""")
            clicked_state = row.get_attribute("data-state")
            row.click()
            page.wait_for_selector("#job-panel:not([hidden])")
            # The panel opens before the job view arrives: wait for its title to name the job.
            page.wait_for_function(
                f"() => document.querySelector('#job-title').textContent.includes('{job_id}')",
                timeout=30_000)

            # While it runs, the loss curve gains points from the live SSE stream, in more
            # than one step (selected before training started, so none came from history).
            try:
                page.wait_for_function(
                    "() => +document.querySelector('#chart-loss').dataset.points > 0 || "
                    "['succeeded', 'failed', 'cancelled'].includes("
                    "document.querySelector('#job-state').textContent)", timeout=600_000)
            except Exception:
                pytest.fail(f"no loss points within 600 s\n{_why(server, job_id)}")
            if page.inner_text("#job-state") == "running":
                _shot(page, tmp_path, "dashboard-running.png")
            assert _points(page, "loss") > 0, _why(server, job_id)
            assert page.inner_text("#log").strip(), "no log lines shown"

            # Through to the end: GRPO rewards, both held-out evals, the final state.
            page.wait_for_function(
                "() => ['succeeded', 'failed', 'cancelled'].includes("
                "document.querySelector('#job-state').textContent)", timeout=600_000)
            final = _shot(page, tmp_path, "dashboard.png")
            state = page.inner_text("#job-state")
            assert state == "succeeded", f"{state}\n{_why(server, job_id)}"
            page.wait_for_function("() => document.querySelector('#stream-status')"
                                   ".textContent === 'finished'", timeout=30_000)
            # Each curve has exactly the API's points: history and live merged, none twice.
            points = httpx.get(f"{base}/v1/jobs/{job_id}/metrics", headers=server["headers"],
                               params={"limit": 10000}, timeout=10).json()["points"]
            assert len(points) >= 24  # 20 SFT steps + 4 GRPO steps
            for chart, key in (("loss", "loss"), ("reward", "reward_mean"),
                               ("throughput", "tokens_per_s")):
                want = sum(isinstance(p.get(key), (int, float)) for p in points)
                assert _points(page, chart) == want, (chart, want)
            assert _points(page, "reward") == 4
            # The loss curve was empty after selection and grew point by point while the
            # page showed the job running.
            growth = [g for g in page.evaluate("window.__growth") if g["chart"] == "chart-loss"]
            running = [g for g in growth if g["state"] == "running"]
            assert clicked_state in ("queued", "starting", "running"), clicked_state
            assert running and min(g["before"] for g in running) == 0, growth
            assert len({g["before"] for g in running} | {running[-1]["points"]}) >= 3, growth
            assert _points(page, "accuracy") == len(_job(server, job_id)["evals"]) == 2
            _check_stages(page, stages)
            evals = _job(server, job_id)["evals"]
            assert len(evals) == 2 and all(ev["prompts"] == 40 for ev in evals), evals
            _check_evals(page, evals, domains)
            states = page.inner_text("#states")  # replayed from the events stream, in order
            assert 0 <= states.find("queued") < states.find("running") < states.find("succeeded"), states
            page.wait_for_function(  # the periodic list refresh shows the end state too
                f"() => document.querySelector('tr[data-job-id=\"{job_id}\"]')"
                ".dataset.state === 'succeeded'", timeout=15_000)
            _shot(page, tmp_path, "dashboard.png")
            # The toy model's evals can all be 0%: the formatting of non-zero values and of a
            # live `eval` record the view had not listed, on a made-up record, shown last.
            fake = {"when": "made up", "version": 99, "greedy": 0.4375, "sampled": 1 / 3,
                    "prompts": 16, "samples": 4, "pass@1": 0.123456, "pass@2": 0.50625,
                    "by_domain": {"a": {"prompts": 8, "greedy": 0.5, "mean@4": 0.25,
                                        "pass@1": 0.25, "pass@2": 2 / 3},
                                  "b": {"prompts": 8, "greedy": 0.375, "mean@4": 0.0655,
                                        "pass@1": 0.0655, "pass@2": 0.99999}}}
            page.evaluate("ev => { addEval(ev); renderEvals(); addEval(ev); renderEvals(); }",
                          fake)
            _check_evals(page, [*_job(server, job_id)["evals"], fake], domains=None)
        finally:
            browser.close()
    assert not errors, errors
    assert not foreign, foreign
    assert final.stat().st_size > 10_000


def _check_stages(page: Any, stages: list[tuple[str, str, int]]) -> None:
    """A row per configured stage with its type and steps; while GRPO ran the SFT stage was
    full, no stage's progress ever went back, and at the end both are full."""
    names = [n for n, _, _ in stages]
    rows = page.eval_on_selector_all("#stages tbody tr", "trs => trs.map(tr => ({...tr.dataset, "
                                     "cells: [...tr.cells].map(td => td.innerText.trim()), "
                                     "value: tr.querySelector('progress').value, "
                                     "max: tr.querySelector('progress').max}))")
    assert [r["stage"] for r in rows] == names, rows
    for r, (_, typ, steps) in zip(rows, stages):
        assert r["cells"][1] == typ and r["cells"][2] == str(steps), r
        assert r["phase"] == "done" and r["done"] == r["steps"] == str(steps), r
        assert r["value"] == r["max"] == steps, r
        assert r["cells"][3].startswith(f"{steps} / {steps}"), r
    seen = page.evaluate("window.__stages")
    brief = "\n".join(f"{s['state']}: " + " ".join(
        f"{r['stage']}:{r['phase']}:{r['done']}" for r in s["rows"]) for s in seen)
    # While the job ran, GRPO's rows advanced step by step (from the live metrics), and
    # whenever GRPO had started the SFT stage was full.
    grpo = [s["rows"] for s in seen if s["state"] == "running" and len(s["rows"]) == 2
            and int(s["rows"][1]["done"]) > 0]
    assert len({r[1]["done"] for r in grpo}) >= 2, brief
    assert any(r[1]["phase"] == "running" for r in grpo), brief
    assert all(r[0]["phase"] == "done" and r[0]["done"] == str(stages[0][2])
               for r in grpo), brief
    sft = [s["rows"][0] for s in seen if s["state"] == "running" and len(s["rows"]) == 2
           and s["rows"][0]["phase"] == "running"]
    assert sft and all(s["done"] != str(stages[0][2]) for s in sft), brief
    # Progress only goes forward: (stage index, step) of the rows never decreases.
    prog = [tuple(int(r["done"]) for r in s["rows"]) for s in seen if len(s["rows"]) == 2]
    assert prog == sorted(prog), brief


def _check_evals(page: Any, evals: list[dict[str, Any]], domains: list[str] | None) -> None:
    """A row per eval record of the job (none twice), in its order, with the record's values
    as the dashboard formats them, and a row per domain under each; rows came in live.
    domains: the domains of every record (None: each record's own)."""
    heads = page.eval_on_selector_all("#evals thead th", "ths => ths.map(th => th.dataset.col)")
    assert heads == ["when", "version", "prompts", "greedy", "sampled", "pass@1",
                     "pass@2"], heads
    cells = page.eval_on_selector_all("#evals tbody tr", """trs => trs.map(tr => ({
        cls: tr.className, domain: tr.dataset.domain || null,
        cells: Object.fromEntries([...tr.cells].map(td => [td.dataset.col, td.innerText.trim()]))
    }))""")
    records = [c for c in cells if c["cls"] == "eval"]
    assert len(records) == len(evals), cells
    assert len(cells) == sum(1 + len(ev["by_domain"]) for ev in evals), cells
    for i, ev in enumerate(evals):
        row = records[i]["cells"]
        want = sorted(ev["by_domain"]) if domains is None else domains
        assert row["pass@1"] == _pct(ev["pass@1"]), (row, ev)
        assert row["pass@2"] == _pct(ev["pass@2"]), (row, ev)
        assert row["greedy"] == _pct(ev["greedy"]) and row["sampled"] == _pct(ev["sampled"]), row
        assert row["when"] == ev["when"] and row["version"] == f"v{ev['version']}", row
        assert row["prompts"] == str(ev["prompts"]), row
        assert sorted(ev["by_domain"]) == want, ev["by_domain"]
        start = cells.index(records[i])
        subs = cells[start + 1:start + 1 + len(want)]
        assert [c["domain"] for c in subs] == want, subs
        for c in subs:
            m = ev["by_domain"][c["domain"]]
            assert c["cells"]["pass@1"] == _pct(m["pass@1"]), (c, m)
            assert c["cells"]["greedy"] == _pct(m["greedy"]), (c, m)
            assert c["cells"]["prompts"] == str(m["prompts"]), (c, m)
            assert c["cells"]["sampled"] == _pct(m[f"mean@{ev['samples']}"]), (c, m)
        assert sum(int(c["cells"]["prompts"]) for c in subs) == ev["prompts"]
    # The "before" eval reached the table while the job ran (from the live stream).
    live = page.evaluate("window.__evals")
    assert any(e["state"] == "running" and e["rows"] >= 1 for e in live), live
