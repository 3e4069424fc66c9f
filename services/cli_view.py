"""Rich terminal views of API jobs for the `nebula` CLI (tables, a status panel, progress)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

STATE_STYLE = {"queued": "yellow", "starting": "cyan", "running": "bold cyan",
               "succeeded": "green", "failed": "bold red", "cancelled": "magenta"}
SHOWN_METRICS = ("loss", "reward_mean", "pass_rate", "tokens_per_s", "samples_per_s",
                 "staleness_mean")


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _state(job: dict[str, Any]) -> str:
    st = job["state"]
    extra = f" #{job['queue_position']}" if st == "queued" and job.get("queue_position") else ""
    return f"[{STATE_STYLE.get(st, '')}]{st}{extra}[/]"


def _metrics(m: dict[str, Any]) -> str:
    return "  ".join(f"{k}={m[k]:.3g}" for k in SHOWN_METRICS if isinstance(m.get(k), (int, float)))


def jobs_table(jobs: list[dict[str, Any]]) -> None:
    t = Table(title=f"{len(jobs)} jobs", show_lines=False)
    for col in ("id", "name", "tenant", "state", "stage", "step", "created", "metrics"):
        t.add_column(col)
    for j in jobs:
        step = f"{j['step']}/{j['total_steps']}" if j.get("total_steps") else str(j.get("step") or "")
        t.add_row(j["id"], j["name"], j["tenant"], _state(j), j.get("stage") or "", step,
                  _ago(j.get("created_at")), _metrics(j.get("latest_metrics") or {}))
    Console().print(t)


def job_panel(job: dict[str, Any]) -> None:
    console = Console()
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    rows = [("id", job["id"]), ("name", job["name"]), ("tenant", job["tenant"]),
            ("state", _state(job)), ("priority", str(job["priority"])),
            ("stage", job.get("stage") or "-"),
            ("step", f"{job.get('step', 0)}/{job.get('total_steps') or '?'}"),
            ("policy version", str(job.get("policy_version") if job.get("policy_version")
                                   is not None else "-")),
            ("created", _ago(job.get("created_at"))), ("started", _ago(job.get("started_at"))),
            ("finished", _ago(job.get("finished_at")))]
    if job.get("error"):
        rows.append(("error", f"[red]{job['error']}[/]"))
    if job.get("latest_metrics"):
        rows.append(("metrics", _metrics(job["latest_metrics"]) or "-"))
    for c in job.get("checkpoints") or []:
        rows.append((c.get("kind", "checkpoint"), c["path"]))
    for e in job.get("evals") or []:
        rows.append(("eval", f"{e.get('when')}: greedy {e.get('greedy', 0):.1%}, "
                     f"sampled {e.get('sampled', 0):.1%}"))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def follow_progress(client: Any, job_id: str) -> int:
    """Progress bars per stage from the job's live events until it ends; the exit code is 0
    if it succeeded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    final: dict[str, Any] = {}
    with Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console) as bar:
        tasks: dict[str, Any] = {}
        counts: dict[str, int] = {}  # metrics rows seen per stage
        steps: dict[str, int] = {}  # the step the record showed per stage

        def task(stage: str) -> Any:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=None, stage=stage, info="")
            return tasks[stage]

        for kind, data in client.events(job_id):
            if kind in ("state", "end"):
                final = data
                stage = data.get("stage")
                if stage and data.get("total_steps"):
                    # The record's step is exact at each stage end (metrics rows may be
                    # fewer, e.g. a resumed stage).
                    steps[stage] = max(steps.get(stage, 0), int(data.get("step") or 0))
                    bar.update(task(stage), total=data["total_steps"],
                               completed=max(counts.get(stage, 0), steps[stage]))
                if kind == "state" and data.get("state") in ("queued", "starting"):
                    pos = data.get("queue_position")
                    bar.console.print(f"{job_id}: {data['state']}"
                                      + (f" (position {pos})" if pos else ""))
            elif kind == "metrics" and data.get("stage"):
                stage = data["stage"]
                counts[stage] = counts.get(stage, 0) + 1
                bar.update(task(stage), completed=max(counts[stage], steps.get(stage, 0)),
                           info=_metrics(data))
            elif kind == "log":
                if not data["line"].startswith("eval "):  # shown as a table (below)
                    bar.console.print(data["line"], markup=False, highlight=False)
            elif kind == "eval":
                from services.progress import eval_table

                ks = sorted(int(k[5:]) for k in data if k.startswith("pass@") and k[5:].isdigit())
                bar.console.print(eval_table(data, ks))
    state = final.get("state", "unknown")
    console.print(f"{job_id}: [{STATE_STYLE.get(state, '')}]{state}[/]"
                  + (f" ({final['error']})" if final.get("error") else ""))
    return 0 if state == "succeeded" else 1
