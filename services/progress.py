"""Terminal progress for `nebula run`: a rich progress bar fed by the learner's status."""

from __future__ import annotations

from typing import Any

from nebula.config.job import JobConfig


def run_with_progress(cfg: JobConfig, job_id: str | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.runner import JobRunner

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
                  transient=False) as progress:
        tasks: dict[str, Any] = {}

        def update(status: dict[str, Any]) -> None:
            stage = status.get("stage")
            if not stage:
                return
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=status.get("total") or 1,
                                                 stage=stage, info="")
            info = "  ".join(f"{k}={status[k]:.3g}" for k in
                             ("loss", "reward_mean", "pass_rate", "staleness_mean", "tokens_per_s")
                             if isinstance(status.get(k), (int, float)))
            progress.update(tasks[stage], completed=status.get("step", 0), info=info)

        runner = JobRunner(cfg, job_id, progress=update, log=progress.console.print)
        summary = runner.run()
        for t in tasks.values():
            progress.update(t, completed=progress.tasks[t].total)
    evals = summary["evals"]
    if len(evals) >= 2:
        b, a = evals[0], evals[-1]
        console.print(f"[bold]held-out accuracy[/] greedy {b['greedy']:.1%} -> {a['greedy']:.1%}"
                      f" ({(a['greedy'] - b['greedy']) * 100:+.1f} pts), sampled "
                      f"{b['sampled']:.1%} -> {a['sampled']:.1%} "
                      f"(x{a['sampled'] / max(b['sampled'], 1e-9):.2f})")
    return summary
