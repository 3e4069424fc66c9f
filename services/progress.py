"""The console of `nebula run`: the plan, one live progress line per stage (step, reward,
pass rate, KL, tokens/s, ETA), each evaluation as a small table and a final summary table.
Nothing else at the default verbosity: the actors write their output (vLLM, Ray, DeepSpeed)
to OUTPUT_DIR/logs/<actor>.log (`nebula.logfiles`); `-v` streams it here instead."""

from __future__ import annotations

from typing import Any

from nebula.config.job import JobConfig

# Live columns: (label, status keys tried in order, format).
COLUMNS = [("loss", ("loss",), ".3g"), ("reward", ("reward_mean",), ".3f"),
           ("pass", ("pass_rate",), ".0%"), ("kl", ("kl", "mismatch_kl_k3"), ".2g"),
           ("tok/s", ("tokens_per_s",), ".0f")]


def plan_table(cfg: JobConfig) -> Any:
    from rich.table import Table

    t = Table(title=f"job {cfg.name}", show_header=False, box=None, pad_edge=False)
    t.add_row("model", cfg.model.path + (f" ({cfg.model.dtype})" if cfg.model.dtype else ""))
    for i, st in enumerate(cfg.stages):
        t.add_row(f"stage {i}", f"{st.type}, {st.steps} steps")
    ro, lc, cl = cfg.rollout, cfg.learner, cfg.cluster
    t.add_row("rollout", f"{ro.workers} x {ro.engine}, n={ro.samples_per_prompt}, "
              f"max_tokens {ro.max_tokens}")
    t.add_row("learner", f"{lc.ranks} rank(s), ZeRO-{lc.zero_stage}, "
              f"{lc.groups_per_step} groups/step")
    t.add_row("services", ", ".join(
        f"{name} {addr or 'embedded'}" for name, addr in
        (("ray", cl.ray_address), ("redis", cl.redis_url), ("verifier", cl.verifier_address))))
    t.add_row("output", f"{cfg.output_dir} (actor logs in {cfg.output_dir}/logs)")
    return t


def eval_table(row: dict[str, Any], ks: list[int]) -> Any:
    from rich.table import Table

    t = Table(title=f"eval {row.get('when', '')} (policy v{row.get('version', '?')}, "
              f"{row.get('prompts', '?')} prompts)", title_justify="left")
    cols = ["greedy", "sampled"] + [f"pass@{k}" for k in ks if row.get(f"pass@{k}") is not None]
    t.add_column("domain")
    for c in cols:
        t.add_column(c, justify="right")
    t.add_row("all", *(f"{row.get(c) or 0:.1%}" for c in cols))
    domains = row.get("greedy_by_domain") or {}
    if len(domains) > 1:
        for d in sorted(domains):
            t.add_row(d, f"{domains[d]:.1%}",
                      f"{(row.get('sampled_by_domain') or {}).get(d, 0):.1%}",
                      *("" for _ in cols[2:]))
    return t


def summary_table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"job {summary['job_id']} done in {summary.get('wall_s', 0):.0f}s",
              title_justify="left")
    for c in ("stage", "steps", "final loss", "wall s", "checkpoint"):
        t.add_column(c, justify="left" if c in ("stage", "checkpoint") else "right")
    for st in summary["stages"]:
        loss = st.get("final_loss")
        t.add_row(st["stage"], str(st.get("steps", "")),
                  "" if loss is None else f"{loss:.4g}",
                  f"{st.get('stage_wall_s', st.get('wall_s', 0)):.0f}",
                  str(st.get("checkpoint") or ""))
    return t


def _info(status: dict[str, Any]) -> str:
    out = []
    for label, keys, fmt in COLUMNS:
        v = next((status[k] for k in keys if isinstance(status.get(k), (int, float))), None)
        if v is not None:
            out.append(f"{label} {v:{fmt}}")
    return "  ".join(out)


def run_with_progress(cfg: JobConfig, job_id: str | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from services.runner import JobRunner

    console = Console(stderr=True)
    console.print(plan_table(cfg))
    with Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), console=console,
                  transient=False) as progress:
        tasks: dict[str, Any] = {}

        def update(status: dict[str, Any]) -> None:
            stage = status.get("stage")
            if not stage:
                return
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=status.get("total") or 1,
                                                 stage=stage, info="")
            progress.update(tasks[stage], completed=status.get("step", 0), info=_info(status))

        runner = JobRunner(cfg, job_id, progress=update, log=progress.console.print)
        runner.on_eval = lambda row: progress.console.print(eval_table(row, cfg.eval.k))
        summary = runner.run()
        for t in tasks.values():
            progress.update(t, completed=progress.tasks[t].total)
    console.print(summary_table(summary))
    evals = summary["evals"]
    if len(evals) >= 2:
        b, a = evals[0], evals[-1]
        console.print(f"[bold]held-out accuracy[/] greedy {b['greedy']:.1%} -> {a['greedy']:.1%}"
                      f" ({(a['greedy'] - b['greedy']) * 100:+.1f} pts), sampled "
                      f"{b['sampled']:.1%} -> {a['sampled']:.1%} "
                      f"(x{a['sampled'] / max(b['sampled'], 1e-9):.2f})")
    if summary.get("export"):
        console.print(f"exported model: {summary['export']}")
    return summary
