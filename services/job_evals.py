"""The held-out evaluations of a job (JobRunner's): greedy and sampled accuracy on the eval
set before and after each measured stage and every `eval.interval` RL steps, recorded in the
job summary, TensorBoard and the trackers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nebula.config.job import JobConfig


class StageEvals:
    """JobRunner's evaluation methods; the runner holds the state they use."""

    cfg: JobConfig
    out: Path
    summary: dict[str, Any]
    learner: Any  # services.learner_group.LearnerGroup
    log: Callable[[str], None]
    on_eval: Callable[[dict[str, Any]], None] | None

    def _eval_refs(self, rollouts: list[Any]) -> list[Any] | None:
        ev = self.cfg.datasets.eval
        if ev is None:
            return None
        d, m, e = ev.model_dump(), self.cfg.eval.max_prompts, self.cfg.eval
        return [rollouts[0].evaluate.remote(d, 0.0, m),
                rollouts[-1].evaluate.remote(d, e.sampled_temperature, m, e.samples)]

    def _eval_record(self, results: list[dict[str, Any]], when: str, **extra: Any) -> None:
        """One eval row: greedy and sampled accuracy (overall and by domain) as before, plus
        the metrics of `nebula eval` (nebula.evaluation: pass@k for `eval.k`, mean@n,
        completion lengths, truncation and their per-domain breakdown), also written as
        TensorBoard scalars (eval/..., step = policy version)."""
        from nebula.evaluation import evaluation_metrics, flat_scalars

        greedy, sampled = results
        metrics = evaluation_metrics(sampled.get("details"), greedy.get("details"),
                                     self.cfg.eval.k)
        allm = {k: v for k, v in metrics["all"].items() if k not in ("prompts", "greedy")}
        row = {"when": when, "version": greedy["version"], "greedy": greedy["accuracy"],
               "sampled": sampled["accuracy"], "greedy_by_domain": greedy["by_domain"],
               "sampled_by_domain": sampled["by_domain"], "prompts": greedy["prompts"],
               **allm, "by_domain": metrics["by_domain"], **extra}
        self.summary["evals"].append(row)
        try:
            from services.evaluate import write_scalars

            scalars = flat_scalars(metrics)
            write_scalars(self.out / "tensorboard", scalars, greedy["version"])
            self.learner.call("log_eval", greedy["version"], scalars)  # W&B / MLflow
        except Exception as e:  # noqa: BLE001 - TensorBoard is a view; the row is recorded
            self.log(f"eval scalars not written to TensorBoard or the trackers: {e}")
        by = ""
        if len(greedy["by_domain"]) > 1:
            by = "; by domain " + ", ".join(
                f"{d}: {g:.1%}/{sampled['by_domain'].get(d, 0):.1%}"
                for d, g in sorted(greedy["by_domain"].items()))
        if self.on_eval is not None:
            self.on_eval(row)
            return
        ks = ", ".join(f"pass@{k} {row[f'pass@{k}']:.1%}" for k in self.cfg.eval.k
                       if row.get(f"pass@{k}") is not None)
        self.log(f"eval {when} (policy v{greedy['version']}): greedy accuracy "
                 f"{greedy['accuracy']:.1%}, sampled (T={self.cfg.eval.sampled_temperature}, "
                 f"n={self.cfg.eval.samples}) {sampled['accuracy']:.1%}"
                 + (f", {ks}" if ks else "") + f" on {greedy['prompts']} held-out prompts{by}")

    def _evaluate(self, rollouts: list[Any], when: str) -> None:
        import ray

        refs = self._eval_refs(rollouts)
        if refs is not None:
            t0 = time.monotonic()
            self._eval_record(ray.get(refs), when, eval_s=time.monotonic() - t0)
