"""Keeping a job alive through a learner's death or a preemption (JobRunner's): a dead learner
is replaced and restored from the newest intact checkpoint; a SIGTERM checkpoints the step the
learner is at."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nebula.config.job import JobConfig


class LearnerRecovery:
    """JobRunner's recovery methods; the runner holds the state they use."""

    cfg: JobConfig
    job_id: str
    summary: dict[str, Any]
    learner: Any  # services.learner_group.LearnerGroup
    rollouts: list[Any]
    resume_path: str | None
    log: Callable[[str], None]
    _learner_args: tuple[Any, ...]
    _learner_options: dict[str, Any]

    def _learner_dead(self) -> bool:
        return self.learner.dead()

    def _restart_learner(self, err: BaseException, stage: int) -> dict[str, Any]:
        """A dead learner: a new one (after `recovery.backoff_s`, doubled each time) restored
        from the newest intact checkpoint; returns where that checkpoint left the job. A job
        past `recovery.max_restarts` fails with the cause of every restart."""
        from nebula.checkpoints import newest_valid
        from services.learner_group import LearnerGroup

        rc = self.cfg.recovery
        cause = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        restarts = self.summary.setdefault("learner_restarts", [])
        restarts.append({"stage": stage, "cause": cause, "time": time.time()})
        if len(restarts) > rc.max_restarts:
            causes = "; ".join(f"#{k + 1} in stage {r['stage']}: {r['cause']}"
                               for k, r in enumerate(restarts))
            raise RuntimeError(f"the learner died {len(restarts)} times, more than "
                               f"recovery.max_restarts {rc.max_restarts}: {causes}") from err
        wait = rc.backoff_s * 2 ** (len(restarts) - 1)
        self.log(f"learner died in stage {stage} ({cause}); restart {len(restarts)} of "
                 f"{rc.max_restarts} in {wait:.0f}s from the newest checkpoint")
        self.learner.kill()  # every rank: the survivors are stuck in collectives
        time.sleep(wait)
        assert self.cfg.checkpoint is not None and self.cfg.checkpoint.dir is not None
        ckpt = newest_valid(self.cfg.checkpoint.dir, log=self.log)
        path = str(ckpt) if ckpt else self.resume_path
        self.learner = LearnerGroup(self.cfg, self._learner_args, self._learner_options,
                                    f"{self.job_id}-learner-r{len(restarts)}",
                                    incarnation=len(restarts))
        state = self.learner.call("restore", path, True)
        if self.cfg.weight_sync_mode() == "nccl":
            self.learner.call("attach_rollouts", self.rollouts)
        restarts[-1].update(checkpoint=path, version=state.get("version"))
        where = (int(state.get("stage_index", 0)), int(state.get("stage_step", 0)))
        if state.get("stage_done"):
            where = (where[0] + 1, 0)
        if path is None:
            where = (0, 0)
        restarts[-1].update(resume_stage=where[0], resume_step=where[1])
        self.log(f"learner restarted from {path or 'the initial model'}: stage {where[0]}, "
                 f"step {where[1]}, policy v{state.get('version')}")
        return {"stage": where[0], "step": where[1], "path": path}

    def _preempt(self, why: BaseException) -> None:
        """SIGTERM (a cancel, an eviction): the learner checkpoints the step it is at, within
        `recovery.preemption_grace_s`, so a resume loses nothing."""
        import ray

        refs = getattr(self, "_stage_ref", None)
        if refs is None:
            return
        self.log(f"preempted ({type(why).__name__}); checkpointing the current step")
        try:
            self.learner.preempt()
            ready, _ = ray.wait(refs, num_returns=len(refs),
                                timeout=self.cfg.recovery.preemption_grace_s)
            if len(ready) == len(refs):
                res = ray.get(refs[0])
                self.summary["preempted"] = res
                self.log(f"checkpoint {res.get('checkpoint')} written; `nebula resume` goes on "
                         "from it")
            else:
                self.log("no checkpoint within recovery.preemption_grace_s")
        except Exception as e:  # noqa: BLE001 - a preemption must still end the job
            self.log(f"preemption checkpoint failed: {e}")
