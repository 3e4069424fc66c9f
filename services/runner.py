"""Turn a job config into Ray actors and run its stages: `nebula run CONFIG`.

Actors: one LearnerWorker (DeepSpeed), `rollout.workers` RolloutWorkers (vLLM engines,
restarted by Ray on a crash), and a WeightStore. Rollout engines start while the learner
runs the SFT stages. A GRPO stage runs rollout and learner concurrently, paced by the
staleness bound; accuracy on the eval set is measured before and after it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nebula.config.job import GRPOStage, JobConfig, SFTStage

ProgressFn = Callable[[dict[str, Any]], None]


def _wait(ref: Any, poll: Callable[[], None] | None, every_s: float = 1.0) -> Any:
    import ray

    while True:
        ready, _ = ray.wait([ref], timeout=every_s)
        if ready:
            return ray.get(ref)
        if poll:
            poll()


class JobRunner:
    def __init__(self, cfg: JobConfig, job_id: str | None = None,
                 progress: ProgressFn | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.job_id = job_id or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        self.progress = progress
        self.log = log
        self.out = Path(cfg.output_dir)
        self.summary: dict[str, Any] = {"job_id": self.job_id, "stages": [], "evals": []}
        # Called after each GRPO stage with (stage index, result, rollout actors); benchmarks
        # use it to measure the bare engines in the same run.
        self.on_grpo_end: Callable[[int, dict[str, Any], list[Any]], None] | None = None

    def run(self) -> dict[str, Any]:
        from services.embedded import embedded_stack

        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.model.toy is not None:
            from learner.toy_model import ensure_toy_model

            t0 = time.monotonic()
            ensure_toy_model(self.cfg.model)
            self.log(f"model ready at {self.cfg.model.path} ({time.monotonic() - t0:.1f}s)")
        t_job = time.monotonic()
        with embedded_stack(self.cfg, self.out / "services") as stack:
            self.summary["redis_url"] = stack["redis_url"]
            self._run_stages(stack)
        self.summary["wall_s"] = time.monotonic() - t_job
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
        return self.summary

    def _actors(self, stack: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
        import ray

        from learner.worker import LearnerWorker
        from rollout.weight_store import WeightStore
        from rollout.worker import RolloutWorker

        job = self.cfg.model_dump(by_alias=True)
        rc = self.cfg.rollout
        store = ray.remote(WeightStore).options(num_cpus=0).remote()
        learner = ray.remote(LearnerWorker).options(
            num_cpus=1, max_concurrency=2, name=f"{self.job_id}-learner",
        ).remote(job, self.job_id, stack["redis_url"], store)
        rollouts = [ray.remote(RolloutWorker).options(
            num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_concurrency=2,
            max_restarts=3, max_task_retries=3, name=f"{self.job_id}-rollout-{i}",
        ).remote(job, self.job_id, i, stack["redis_url"], stack["verifier_address"], store)
            for i in range(rc.workers)]
        return store, learner, rollouts

    def _poll(self, learner: Any) -> Callable[[], None]:
        import ray

        def poll() -> None:
            if self.progress:
                try:
                    self.progress(ray.get(learner.get_status.remote(), timeout=5))
                except Exception:  # noqa: BLE001 - progress is best effort
                    pass
        return poll

    def _evaluate(self, rollouts: list[Any], when: str, version: int) -> None:
        import ray

        ev = self.cfg.datasets.eval
        if ev is None:
            return
        d = ev.model_dump()
        m = self.cfg.eval.max_prompts
        greedy, sampled = ray.get([
            rollouts[0].evaluate.remote(d, 0.0, m),
            rollouts[-1].evaluate.remote(d, self.cfg.eval.sampled_temperature, m, 4)])
        row = {"when": when, "version": version, "greedy": greedy["accuracy"],
               "sampled": sampled["accuracy"], "greedy_by_domain": greedy["by_domain"],
               "sampled_by_domain": sampled["by_domain"]}
        self.summary["evals"].append(row)
        self.log(f"eval {when} (policy v{greedy['version']}): greedy accuracy "
                 f"{greedy['accuracy']:.1%}, sampled (T={self.cfg.eval.sampled_temperature}) "
                 f"{sampled['accuracy']:.1%} on {greedy['prompts']} held-out prompts")

    def _run_stages(self, stack: dict[str, Any]) -> None:
        import ray

        _, learner, rollouts = self._actors(stack)
        poll = self._poll(learner)
        try:
            for i, stage in enumerate(self.cfg.stages):
                t0 = time.monotonic()
                if isinstance(stage, SFTStage):
                    self.log(f"stage {i}: sft, {stage.steps} steps")
                    res = _wait(learner.run_sft.remote(i, stage.model_dump()), poll)
                    ray.get(learner.publish.remote())
                elif isinstance(stage, GRPOStage):
                    version = ray.get(learner.publish.remote())
                    ray.get([w.pid.remote() for w in rollouts])  # engines up before timing
                    self._evaluate(rollouts, f"before stage {i} (grpo)", version)
                    keys_id = f"{self.job_id}-{i}"
                    self.log(f"stage {i}: grpo, {stage.steps} steps, max_staleness "
                             f"{self.cfg.async_.max_staleness}")
                    runs = [w.run.remote(f"grpo{i}", keys_id, stage.steps) for w in rollouts]
                    res = _wait(learner.run_grpo.remote(i, stage.model_dump(), keys_id), poll)
                    import redis

                    from nebula.transport.pacing import JobKeys

                    redis.Redis.from_url(stack["redis_url"]).set(JobKeys(keys_id).stop, 1)
                    res["rollout"] = ray.get(runs)
                    if self.on_grpo_end:
                        self.on_grpo_end(i, res, rollouts)
                    self._evaluate(rollouts, f"after stage {i} (grpo)", res["final_version"])
                else:  # pragma: no cover - the config admits only the stages above
                    raise ValueError(f"unsupported stage {stage}")
                # The stage's own figures (e.g. the learner's GRPO loop time, "wall_s") stay;
                # this one also counts engine start-up, publishing and evaluation.
                res["stage_wall_s"] = time.monotonic() - t0
                self.summary["stages"].append(res)
            export = ray.get(learner.export.remote())
            self.summary["export"] = export
            self.log(f"exported Hugging Face checkpoint to {export}")
        finally:
            for a in [learner, *rollouts]:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
