"""Turn a job config into Ray actors and run its stages: `nebula run CONFIG`.

Actors: one LearnerWorker (DeepSpeed), `rollout.workers` RolloutWorkers (vLLM engines,
restarted by Ray on a crash), and a WeightStore. Stages dispatch through the algorithm
registry (`nebula.algo`): rollout engines start while the learner runs the offline stages
(sft, dpo). An online stage (grpo, opd, mopd) runs rollout and learner concurrently,
paced by the staleness bound; accuracy on the eval set is measured before and after it
(and every `eval.interval` learner steps). The learner checkpoints at every stage end; a job
with `resume_from` restores that checkpoint and goes on from the stage and step it holds.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nebula.algo import algorithm
from nebula.config.job import JobConfig

ProgressFn = Callable[[dict[str, Any]], None]


def _wait(ref: Any, poll: Callable[[], None] | None, every_s: float = 1.0) -> Any:
    import ray

    while True:
        ready, _ = ray.wait([ref], timeout=every_s)
        if ready:
            return ray.get(ref)
        if poll:
            poll()


MAX_ROLLOUT_RAISES = 3  # a rollout loop that raises this often in one stage fails the job


def _env(env_vars: dict[str, str] | None) -> dict[str, Any] | None:
    from nebula.faults import ENV

    env = dict(env_vars or {})
    if os.environ.get(ENV):  # a fault drill reaches the actors it names
        env[ENV] = os.environ[ENV]
    return {"env_vars": env} if env else None


class JobRunner:
    def __init__(self, cfg: JobConfig, job_id: str | None = None,
                 progress: ProgressFn | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.job_id = job_id or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        self.progress = progress
        self.log = log
        self.out = Path(cfg.output_dir)
        self.summary: dict[str, Any] = {"job_id": self.job_id, "stages": [], "evals": []}
        # Called after each RL stage with (stage index, result, rollout actors); benchmarks
        # use it to measure the bare engines in the same run.
        self.on_grpo_end: Callable[[int, dict[str, Any], list[Any]], None] | None = None

    def run(self) -> dict[str, Any]:
        from services.embedded import embedded_stack

        if self.cfg.model.path.endswith(".gguf"):  # a real checkpoint: import it once
            from nebula.model_import import ensure_hf_model

            t0 = time.monotonic()
            src = self.cfg.model.path
            self.cfg.model.path = ensure_hf_model(src, self.cfg.model.import_dir)
            self.log(f"model {src} -> {self.cfg.model.path} ({time.monotonic() - t0:.1f}s)")
        if self.cfg.model.toy is not None:
            from nebula.toy_model import ensure_toy_model

            t0 = time.monotonic()
            ensure_toy_model(self.cfg.model)
            self.log(f"model ready at {self.cfg.model.path} ({time.monotonic() - t0:.1f}s)")
        self.preflight()  # bad input is refused before the output dir or any worker exists
        self.out.mkdir(parents=True, exist_ok=True)
        t_job = time.monotonic()
        with embedded_stack(self.cfg, self.out / "services") as stack:
            self.summary["redis_url"] = stack["redis_url"]
            self._check_teachers(stack.get("teacher_address"))
            self._run_stages(stack)
        self.summary["wall_s"] = time.monotonic() - t_job
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
        return self.summary

    # -- checks before anything starts -------------------------------------------------------

    def preflight(self) -> None:
        """Errors a job is refused for before any service or worker starts, naming the field,
        file or row: a context too short for `rollout.max_tokens`, a prompt that does not fit
        beside it, chat options the tokenizer cannot honour, and each stage's own (an SFT or
        preference row too long, an unrouted mopd domain)."""
        from transformers import AutoTokenizer

        from nebula.prompts import context_len, load_prompt_rows

        cfg = self.cfg
        ctx = context_len(cfg.model)
        budget = ctx - cfg.rollout.max_tokens
        if budget <= 0:
            raise ValueError(f"rollout.max_tokens: {cfg.rollout.max_tokens} completion tokens "
                             f"leave no room for a prompt in the model's {ctx}-token context "
                             "(model.max_model_len)")
        tok = AutoTokenizer.from_pretrained(cfg.model.path)
        train = [r for d in cfg.datasets.train for r in load_prompt_rows(d, tok, budget)]
        if cfg.datasets.eval is not None:
            load_prompt_rows(cfg.datasets.eval, tok, budget)
        domains = sorted({r.domain for r in train})
        for i, st in enumerate(cfg.stages):
            algorithm(st, cfg).preflight(f"stages.{i}", tok, ctx, domains)

    def _check_teachers(self, address: str | None) -> None:
        """Every teacher the stages name is hosted and shares the student's tokenizer."""
        names = self.cfg.teacher_names()
        if not names:
            return
        from nebula.clients.teacher import TeacherClient, check_compatible

        assert address is not None
        with TeacherClient(address) as client:
            client.wait_ready()
            for n in names:
                info = check_compatible(client, n, self.cfg.model.path)
                self.summary.setdefault("teachers", {})[n] = info["version"]
                self.log(f"teacher {n} (version {info['version']}) at {address}")

    # -- actors ------------------------------------------------------------------------------

    def _actors(self, stack: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
        import ray

        from learner.worker import LearnerWorker
        from rollout.weight_store import WeightStore
        from rollout.worker import RolloutWorker

        from nebula.cpu_binding import cpu_binding

        job = self.cfg.model_dump(by_alias=True)
        rc = self.cfg.rollout
        bind = cpu_binding(self.cfg)
        from learner.dist_env import MALLOC_ENV

        store = ray.remote(WeightStore).options(num_cpus=0).remote()
        learner = ray.remote(LearnerWorker).options(
            num_cpus=1, max_concurrency=4, name=f"{self.job_id}-learner",
            runtime_env=_env({**MALLOC_ENV, **({"NEBULA_CPU_BIND": bind["learner"]}
                                              if bind else {})}),
        ).remote(job, self.job_id, stack["redis_url"], store)
        rollouts = [ray.remote(RolloutWorker).options(
            num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_concurrency=4,
            max_restarts=3, max_task_retries=3, name=f"{self.job_id}-rollout-{i}",
            runtime_env=_env(bind and {"NEBULA_CPU_BIND": bind["rollout"],
                                       "NEBULA_HOST_CPU_BIND": bind["learner"]}),
        ).remote(job, self.job_id, i, stack["redis_url"], stack["verifier_address"], store,
                 stack.get("teacher_address"))
            for i in range(rc.workers)]
        if self.cfg.weight_sync_mode() == "nccl":
            ray.get(learner.attach_rollouts.remote(rollouts))
            self.log("weight sync: NCCL broadcast from the learner into each engine")
        return store, learner, rollouts

    def _poll(self, learner: Any, extra: Callable[[dict[str, Any]], None] | None = None
              ) -> Callable[[], None]:
        import ray

        def poll() -> None:
            try:
                status = ray.get(learner.get_status.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                return
            if self.progress:
                self.progress(status)
            if extra:
                extra(status)
        return poll

    # -- evaluation --------------------------------------------------------------------------

    def _eval_refs(self, rollouts: list[Any]) -> list[Any] | None:
        ev = self.cfg.datasets.eval
        if ev is None:
            return None
        d, m = ev.model_dump(), self.cfg.eval.max_prompts
        return [rollouts[0].evaluate.remote(d, 0.0, m),
                rollouts[-1].evaluate.remote(d, self.cfg.eval.sampled_temperature, m, 4)]

    def _eval_record(self, results: list[dict[str, Any]], when: str, **extra: Any) -> None:
        greedy, sampled = results
        row = {"when": when, "version": greedy["version"], "greedy": greedy["accuracy"],
               "sampled": sampled["accuracy"], "greedy_by_domain": greedy["by_domain"],
               "sampled_by_domain": sampled["by_domain"], **extra}
        self.summary["evals"].append(row)
        by = ""
        if len(greedy["by_domain"]) > 1:
            by = "; by domain " + ", ".join(
                f"{d}: {g:.1%}/{sampled['by_domain'].get(d, 0):.1%}"
                for d, g in sorted(greedy["by_domain"].items()))
        self.log(f"eval {when} (policy v{greedy['version']}): greedy accuracy "
                 f"{greedy['accuracy']:.1%}, sampled (T={self.cfg.eval.sampled_temperature}) "
                 f"{sampled['accuracy']:.1%} on {greedy['prompts']} held-out prompts{by}")

    def _evaluate(self, rollouts: list[Any], when: str) -> None:
        import ray

        refs = self._eval_refs(rollouts)
        if refs is not None:
            t0 = time.monotonic()
            self._eval_record(ray.get(refs), when, eval_s=time.monotonic() - t0)

    # -- stages ------------------------------------------------------------------------------

    def _resume_point(self, learner: Any) -> tuple[int, int]:
        """(first stage to run, learner steps of it already done) after restoring
        `resume_from`; (0, 0) for a fresh job."""
        import ray

        if not self.cfg.resume_from:
            return 0, 0
        state = ray.get(learner.restore.remote(self.cfg.resume_from))
        stage, step = int(state.get("stage_index", 0)), int(state.get("stage_step", 0))
        if state.get("stage_done"):
            stage, step = stage + 1, 0
        self.summary["resumed_from"] = {"path": self.cfg.resume_from, "stage": stage,
                                        "step": step, "version": state.get("version")}
        self.log(f"resumed from {self.cfg.resume_from}: stage {stage}, step {step}, "
                 f"policy v{state.get('version')}")
        return stage, step

    def _run_rl(self, i: int, stage: Any, start: int, stack: dict[str, Any], learner: Any,
                rollouts: list[Any]) -> dict[str, Any]:
        import ray
        import redis

        from nebula.transport.pacing import JobKeys

        version = ray.get(learner.publish.remote())
        ray.get([w.pid.remote() for w in rollouts])  # engines up before timing
        evals = self.summary["evals"]
        if not (evals and evals[-1]["version"] == version):  # not measured at these weights
            self._evaluate(rollouts, f"before stage {i} ({stage.type})")
        keys_id = f"{self.job_id}-{i}" + (f"-from{start}" if start else "")
        keys = JobKeys(keys_id)
        r = redis.Redis.from_url(stack["redis_url"])
        if start:  # resumed mid-stage: tickets and pacing go on from the checkpoint's step
            G = self.cfg.learner.groups_per_step
            r.set(keys.tickets, start * G)
            r.set(keys.steps_published, start)
        self.log(f"stage {i}: {stage.type}, {stage.steps} steps"
                 + (f" from step {start}" if start else "")
                 + f", max_staleness {self.cfg.async_.max_staleness}")
        t_stage = time.monotonic()
        every = self.cfg.eval.interval
        pending: list[tuple[int, float, list[Any]]] = []
        next_eval = [start + every] if every else [stage.steps + 1]

        args = (f"{stage.type}{i}", keys_id, stage.model_dump())
        runs = [w.run.remote(*args) for w in rollouts]
        raised = [0] * len(rollouts)

        def watch_rollouts() -> None:
            """A worker whose loop raised (a bug, a lost connection) runs it again: the
            groups it had reserved are generated again first, so nothing is lost and the
            learner does not wait forever on them. The third time fails the job loudly."""
            for k, ref in enumerate(runs):
                if not ray.wait([ref], timeout=0)[0]:
                    continue
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - any error of the loop
                    raised[k] += 1
                    if raised[k] >= MAX_ROLLOUT_RAISES:
                        raise RuntimeError(f"rollout-{k} failed {raised[k]} times in stage {i} "
                                           f"({stage.type}); last error: {e}") from e
                    self.log(f"rollout-{k} raised ({type(e).__name__}: {str(e)[:300]}); "
                             "running it again, its unfinished groups first")
                    runs[k] = rollouts[k].run.remote(*args)

        def periodic(status: dict[str, Any]) -> None:
            watch_rollouts()
            step = int(status.get("step") or 0)
            if status.get("stage") == f"{stage.type}{i}" and step >= next_eval[0] \
                    and step < stage.steps:
                refs = self._eval_refs(rollouts)
                if refs is not None:
                    pending.append((step, time.monotonic(), refs))
                next_eval[0] = step + every
            for p in list(pending):
                if all(ray.wait([ref], timeout=0)[0] for ref in p[2]):
                    pending.remove(p)
                    self._eval_record(ray.get(p[2]), f"during stage {i} ({stage.type}) at "
                                      f"step {p[0]}", step=p[0],
                                      stage_elapsed_s=p[1] - t_stage,
                                      eval_s=time.monotonic() - p[1])

        res = _wait(learner.run_rl.remote(i, stage.model_dump(), keys_id),
                    self._poll(learner, periodic))
        r.set(keys.stop, 1)
        res["rollout"] = ray.get(runs)
        res["rollout_raises"] = raised
        for step, t0, refs in pending:
            self._eval_record(ray.get(refs), f"during stage {i} ({stage.type}) at step {step}",
                              step=step, stage_elapsed_s=t0 - t_stage,
                              eval_s=time.monotonic() - t0)
        t_done = time.monotonic() - t_stage  # the final eval sees the weights of this time
        if self.on_grpo_end:
            self.on_grpo_end(i, res, rollouts)
        n_evals = len(self.summary["evals"])
        self._evaluate(rollouts, f"after stage {i} ({stage.type})")
        if len(self.summary["evals"]) > n_evals:
            self.summary["evals"][-1].update(step=stage.steps, stage_elapsed_s=t_done)
        return res

    def _run_stages(self, stack: dict[str, Any]) -> None:
        import ray

        _, learner, rollouts = self._actors(stack)
        try:
            first, start = self._resume_point(learner)
            for i, stage in enumerate(self.cfg.stages):
                if i < first:
                    continue
                s0 = start if i == first else 0
                t0 = time.monotonic()
                algo = algorithm(stage, self.cfg)
                if not algo.online:
                    measured = algo.measured and self.cfg.datasets.eval is not None
                    if measured:
                        ray.get(learner.publish.remote())
                        self._evaluate(rollouts, f"before stage {i} ({stage.type})")
                    self.log(f"stage {i}: {stage.type}, {stage.steps} steps"
                             + (f" from step {s0}" if s0 else ""))
                    res = _wait(learner.run_offline.remote(i, stage.model_dump(), s0),
                                self._poll(learner))
                    ray.get(learner.publish.remote())
                    if measured:
                        self._evaluate(rollouts, f"after stage {i} ({stage.type})")
                else:
                    res = self._run_rl(i, stage, s0, stack, learner, rollouts)
                # The stage's own figures (e.g. the learner's RL loop time, "wall_s") stay;
                # this one also counts engine start-up, publishing and evaluation.
                res["stage_wall_s"] = time.monotonic() - t0
                self.summary["stages"].append(res)
                self.summary.setdefault("checkpoints", []).append(res.get("checkpoint"))
            if not self.summary["evals"] and first < len(self.cfg.stages):
                # No RL stage measured the model (an SFT-only job, e.g. a teacher): once at
                # the end.
                self._evaluate(rollouts, f"after stage {len(self.cfg.stages) - 1} "
                               f"({self.cfg.stages[-1].type})")
            export = ray.get(learner.export.remote())
            self.summary["export"] = export
            self.log(f"exported Hugging Face checkpoint to {export}")
        finally:
            for a in [learner, *rollouts]:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
