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
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nebula import faults
from nebula.algo import algorithm
from nebula.config.job import JobConfig
from nebula.transport.redis_client import connect
from services.job_evals import StageEvals
from services.job_recovery import LearnerRecovery

ProgressFn = Callable[[dict[str, Any]], None]


MAX_ROLLOUT_RAISES = 3  # a rollout loop that raises this often in one stage fails the job


def _env(env_vars: dict[str, str] | None) -> dict[str, Any] | None:
    from nebula.faults import ENV

    from nebula.logfiles import LOG_DIR_ENV

    env = dict(env_vars or {})
    for var in (ENV, LOG_DIR_ENV):  # a fault drill reaches the actors it names; their logs
        if os.environ.get(var):     # go to the job's log dir
            env[var] = os.environ[var]
    return {"env_vars": env} if env else None


def _node_id(_: Any) -> str:
    """The Ray node an actor runs on (called inside it through `__ray_call__`)."""
    import ray

    return ray.get_runtime_context().get_node_id()


class JobRunner(StageEvals, LearnerRecovery):
    """One training job: its actors, its stages in order, evaluations (services.job_evals) and
    recovery (services.job_recovery)."""

    def __init__(self, cfg: JobConfig, job_id: str | None = None,
                 progress: ProgressFn | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.job_id = job_id or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        self.progress = progress
        self.log = log
        self.out = Path(cfg.output_dir)
        self.summary: dict[str, Any] = {"job_id": self.job_id, "stages": [], "evals": []}
        self.resume_path: str | None = None  # the intact checkpoint `resume_from` names
        # Called after each RL stage with (stage index, result, rollout actors); benchmarks
        # use it to measure the bare engines in the same run.
        self.on_grpo_end: Callable[[int, dict[str, Any], list[Any]], None] | None = None
        # SIGKILLs a supervised service of the embedded default by name (fault drills).
        self._kill_service: Callable[[str], None] | None = None
        # Gets each eval row (the console's tables); None: one log line per eval.
        self.on_eval: Callable[[dict[str, Any]], None] | None = None

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
        from nebula.logfiles import actor_logs

        actor_logs(self.out / "logs")  # the actors' output goes there (not with -v)
        t_job = time.monotonic()
        with embedded_stack(self.cfg, self.out / "services") as stack:
            self.summary["redis_url"] = stack["redis_url"]
            self._kill_service = stack.get("kill")
            from services.preflight import check_teachers

            teachers = check_teachers(self.cfg, stack.get("teacher_address"), self.log)
            if teachers:
                self.summary["teachers"] = teachers
            self._run_stages(stack)
        self.summary["wall_s"] = time.monotonic() - t_job
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
        return self.summary

    # -- checks before anything starts -------------------------------------------------------

    def preflight(self) -> None:
        """Bad input refused before any service or worker starts (`services.preflight`)."""
        from services.preflight import preflight

        self.resume_path = preflight(self.cfg, self.log)

    # -- actors ------------------------------------------------------------------------------

    def _actors(self, stack: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
        import ray

        from rollout.weight_store import WeightStore
        from rollout.worker import RolloutWorker

        from nebula.cpu_binding import cpu_binding
        from nebula.resources import check_capacity, job_resources
        from services.learner_group import LearnerGroup

        # More than the cluster has fails now, with the numbers, not as a placement that
        # waits forever in Ray's scheduler.
        check_capacity(job_resources(self.cfg), ray.cluster_resources(), "the Ray cluster")
        job = self.cfg.model_dump(by_alias=True)
        rc = self.cfg.rollout
        bind = cpu_binding(self.cfg)
        from learner.dist_env import MALLOC_ENV

        store = ray.remote(WeightStore).options(num_cpus=0).remote()
        self._learner_args = (job, self.job_id, stack["redis_url"], store)
        self._learner_options = dict(
            max_concurrency=4,
            runtime_env=_env({**MALLOC_ENV, **({"NEBULA_CPU_BIND": bind["learner"]}
                                              if bind else {})}))
        learner = LearnerGroup(self.cfg, self._learner_args, self._learner_options,
                               f"{self.job_id}-learner")
        if self.cfg.learner.ranks > 1:
            self.log(f"learner: {self.cfg.learner.ranks} data-parallel ranks "
                     f"(ZeRO-{self.cfg.learner.zero_stage})")
        rollouts = [ray.remote(RolloutWorker).options(
            num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, resources=rc.resources or None,
            max_concurrency=4,
            max_restarts=3, max_task_retries=3, name=f"{self.job_id}-rollout-{i}",
            runtime_env=_env(bind and {"NEBULA_CPU_BIND": bind["rollout"],
                                       "NEBULA_HOST_CPU_BIND": bind["learner"]}),
        ).remote(job, self.job_id, i, stack["redis_url"], stack["verifier_address"], store,
                 stack.get("teacher_address"))
            for i in range(rc.workers)]
        self.learner, self.rollouts = learner, rollouts
        self.summary["learner_ranks"] = self.cfg.learner.ranks
        self.summary["placement"] = {  # the Ray node of each actor
            "learner": learner.nodes(),
            "rollout": ray.get([w.__ray_call__.remote(_node_id) for w in rollouts])}
        if self.cfg.weight_sync_mode() == "nccl":
            learner.call("attach_rollouts", rollouts)
            self.log("weight sync: NCCL broadcast from the learner into each engine")
        return store, learner, rollouts

    def _poll(self, learner: Any, extra: Callable[[dict[str, Any]], None] | None = None
              ) -> Callable[[], None]:
        import ray

        def poll() -> None:
            try:
                status = ray.get(learner.lead.get_status.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                return
            if self.progress:
                self.progress(status)
            if extra:
                extra(status)
            step = int(status.get("step") or 0)
            if faults.reached("driver.sigterm_at_step", step):
                os.kill(os.getpid(), signal.SIGTERM)  # a preemption drill, at a known step
            for svc in ("redis", "verifier", "teacher"):  # chaos drills: a service dies
                if faults.reached(f"driver.kill_{svc}_at_step", step) and self._kill_service:
                    self.log(f"fault drill: killing the {svc} service at learner step {step}")
                    self._kill_service(svc)
        return poll

    # -- stages ------------------------------------------------------------------------------

    def _resume_point(self, learner: Any) -> tuple[int, int]:
        """(first stage to run, learner steps of it already done) after restoring
        `resume_from`; (0, 0) for a fresh job."""
        if not self.cfg.resume_from:
            return 0, 0
        state = learner.call("restore", self.resume_path)
        stage, step = int(state.get("stage_index", 0)), int(state.get("stage_step", 0))
        if state.get("stage_done"):
            stage, step = stage + 1, 0
        self.summary["resumed_from"] = {"path": self.resume_path, "stage": stage, "step": step,
                                        "requested": self.cfg.resume_from,
                                        "version": state.get("version")}
        self.log(f"resumed from {self.resume_path}: stage {stage}, step {step}, "
                 f"policy v{state.get('version')}")
        return stage, step

    def _run_stage(self, i: int, stage: Any, s0: int, stack: dict[str, Any],
                   rollouts: list[Any], replay: bool) -> dict[str, Any]:
        """Stage i from learner step s0; replay: the learner was restarted in it (no 'before'
        evaluation again; an RL stage reads its stream again)."""
        algo = algorithm(stage, self.cfg)
        if algo.online:
            return self._run_rl(i, stage, s0, stack, rollouts, replay)
        measured = algo.measured and self.cfg.datasets.eval is not None
        if measured and not replay:
            self.learner.call("publish")
            self._evaluate(rollouts, f"before stage {i} ({stage.type})")
        self.log(f"stage {i}: {stage.type}, {stage.steps} steps"
                 + (f" from step {s0}" if s0 else ""))
        res = self._wait_stage(self.learner.submit("run_offline", i, stage.model_dump(), s0),
                               self._poll(self.learner))
        self.learner.call("publish")
        if measured:
            self._evaluate(rollouts, f"after stage {i} ({stage.type})")
        return res

    def _wait_stage(self, refs: list[Any], poll: Callable[[], None]) -> Any:
        """Rank 0's result of a stage call running on every learner rank."""
        from services.learner_group import wait_all

        self._stage_ref = refs  # what a preemption waits for
        res = wait_all(refs, poll)
        self._stage_ref = None
        return res

    def _run_rl(self, i: int, stage: Any, start: int, stack: dict[str, Any],
                rollouts: list[Any], replay: bool = False) -> dict[str, Any]:
        import ray

        from nebula.transport.pacing import JobKeys

        r = connect(stack["redis_url"])
        rl = self._rl if replay and self._rl.get("stage") == i else {}
        if rl and start < int(r.get(JobKeys(rl["keys_id"]).acked_steps) or 0):
            # The restored checkpoint is older than groups already acknowledged (and maybe
            # trimmed), e.g. the newest was corrupt: generate this stage's groups again from it.
            r.set(JobKeys(rl["keys_id"]).stop, 1)
            ray.wait(rl["runs"], num_returns=len(rl["runs"]), timeout=120)
            rl = {}
        if rl:  # the learner was restarted: it reads the unacknowledged groups again
            keys_id, runs, raised = rl["keys_id"], rl["runs"], rl["raised"]
            keys = JobKeys(keys_id)
            r.set(keys.steps_published, start)
            self.log(f"stage {i}: {stage.type} goes on from step {start} with the groups "
                     "trained since the checkpoint replayed")
        else:
            version = self.learner.call("publish")
            ray.get([w.pid.remote() for w in rollouts])  # engines up before timing
            evals = self.summary["evals"]
            if not replay and not (evals and evals[-1]["version"] == version):
                self._evaluate(rollouts, f"before stage {i} ({stage.type})")
            n = len(self.summary.get("learner_restarts", []))
            keys_id = f"{self.job_id}-{i}" + (f"-r{n}" if replay else "") \
                + (f"-from{start}" if start else "")
            keys = JobKeys(keys_id)
            if start:  # resumed mid-stage: tickets and pacing go on from the checkpoint's step
                G = self.cfg.learner.groups_per_step
                r.set(keys.tickets, start * G)
                r.set(keys.steps_published, start)
            self.log(f"stage {i}: {stage.type}, {stage.steps} steps"
                     + (f" from step {start}" if start else "")
                     + f", max_staleness {self.cfg.async_.max_staleness}")
            args = (f"{stage.type}{i}", keys_id, stage.model_dump())
            runs = [w.run.remote(*args) for w in rollouts]
            raised = [0] * len(rollouts)
            self._rl = {"stage": i, "keys_id": keys_id, "runs": runs, "raised": raised}
        args = (f"{stage.type}{i}", keys_id, stage.model_dump())
        t_stage = time.monotonic()
        every = self.cfg.eval.interval
        pending: list[tuple[int, float, list[Any]]] = []
        next_eval = [start + every] if every else [stage.steps + 1]

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

        res = self._wait_stage(self.learner.submit("run_rl", i, stage.model_dump(), keys_id),
                               self._poll(self.learner, periodic))
        if "preempted_at" in res:
            return res
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
        self._rl: dict[str, Any] = {}
        try:
            first, start = self._resume_point(learner)
            i, s0, replay = first, start, False
            while i < len(self.cfg.stages):
                stage = self.cfg.stages[i]
                t0 = time.monotonic()
                try:
                    res = self._run_stage(i, stage, s0, stack, rollouts, replay)
                except ray.exceptions.RayError as e:
                    # A rank that died (RayActorError), or a survivor whose collective broke
                    # with it (RayTaskError): restart when a rank is gone; anything else
                    # (the learner raised) fails the job.
                    if not self._learner_dead():
                        raise
                    where = self._restart_learner(e, i)
                    if where["stage"] > i or where["stage"] < i - 1:
                        raise RuntimeError(
                            f"cannot recover stage {i}: the newest intact checkpoint "
                            f"{where['path']} is from stage {where['stage']}") from e
                    if where["stage"] < i:  # the previous stage's end: this one from 0
                        where["stage"], where["step"] = i, 0
                    s0, replay = where["step"], True
                    continue
                # The stage's own figures (e.g. the learner's RL loop time, "wall_s") stay;
                # this one also counts engine start-up, publishing and evaluation.
                res["stage_wall_s"] = time.monotonic() - t0
                self.summary["stages"].append(res)
                self.summary.setdefault("checkpoints", []).append(res.get("checkpoint"))
                i, s0, replay = i + 1, 0, False
            if not self.summary["evals"] and first < len(self.cfg.stages):
                # No RL stage measured the model (an SFT-only job, e.g. a teacher): once at
                # the end.
                self._evaluate(self.rollouts, f"after stage {len(self.cfg.stages) - 1} "
                               f"({self.cfg.stages[-1].type})")
            export = self.learner.call("export")
            self.summary["export"] = export
            self.log(f"exported Hugging Face checkpoint to {export}")
        except (KeyboardInterrupt, SystemExit) as e:
            self._preempt(e)
            raise
        except BaseException as e:
            if type(e).__name__ == "Cancelled":  # services.jobs.process: SIGTERM
                self._preempt(e)
            raise
        finally:
            self.learner.kill()
            for a in self.rollouts:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
