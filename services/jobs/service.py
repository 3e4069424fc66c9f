"""What the REST routes do: create, cancel and resume jobs, admit queued ones, and keep the
records in step with Ray (the same pass reconciles after an API restart)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from nebula.config.load import ConfigError, load_model
from services.api.settings import ApiConfig
from services.jobs import queue
from services.jobs.keys import ACTIVE, LAUNCHED, TERMINAL
from services.jobs.launcher import RayLauncher
from services.jobs.store import JobStore

log = logging.getLogger("nebula.api")


class NotFound(LookupError):
    pass


class Conflict(ValueError):
    pass


def new_job_id() -> str:
    # Fixed-length random ids: no id is a prefix of another's Redis keys.
    return "j" + uuid.uuid4().hex[:16]


def validate_job_config(raw: Any, job_id: str, work_dir: Path) -> dict[str, Any]:
    """The job config as stored: `validated_job_config`, dumped with every default filled
    in."""
    return validated_job_config(raw, job_id, work_dir).model_dump(mode="json", by_alias=True)


def validated_job_config(raw: Any, job_id: str, work_dir: Path) -> Any:
    """The JobConfig of a submitted config, validated whole (ConfigError names each bad
    field). The service places job outputs: output_dir (default
    jobs/<id>) and checkpoint.dir (default output_dir/checkpoints) become absolute under the
    work dir, because a job's driver and its Ray actors run in different directories. A
    config with `kind: eval` is an eval job's (nebula.evaluation.EvalJobConfig)."""
    from nebula.config.job import JobConfig
    from nebula.evaluation import EvalJobConfig, is_eval_config

    if not isinstance(raw, dict):
        raise ConfigError(f"job config must be a mapping, got {type(raw).__name__}",
                          [{"field": "<root>", "message": "must be a mapping", "type": "type"}])
    data = dict(raw)
    out = data.get("output_dir")
    out = out if isinstance(out, str) and out else f"jobs/{job_id}"
    data["output_dir"] = str(work_dir / out)  # an absolute output_dir stays as it is
    ck = data.get("checkpoint")
    if isinstance(ck, dict):
        ck_dir = ck.get("dir")
        ck_dir = ck_dir if isinstance(ck_dir, str) and ck_dir else "checkpoints"
        data["checkpoint"] = {**ck, "dir": str(Path(data["output_dir"]) / ck_dir)}
    model: type = EvalJobConfig if is_eval_config(data) else JobConfig
    cfg = load_model(model, data, source="eval job config" if model is EvalJobConfig
                     else "job config")
    from nebula.config.paths import relative_input_paths

    rel = relative_input_paths(cfg)
    base = getattr(cfg, "base_model", None)  # an eval job's (EvalJobConfig)
    if base and not Path(base).is_absolute():
        rel.append(("base_model", base))
    if rel:  # the service cannot know what they were relative to (nebula/config/paths.py)
        raise ConfigError(
            "job config: relative input path(s): " + ", ".join(f"{f}={v!r}" for f, v in rel),
            [{"field": f, "message": f"relative path {v!r}: give an absolute path (`nebula "
              "submit` resolves relative paths against its working directory)",
              "type": "relative_path"} for f, v in rel])
    return cfg


class JobService:
    def __init__(self, cfg: ApiConfig, store: JobStore, launcher: RayLauncher) -> None:
        self.cfg = cfg
        self.store = store
        self.launcher = launcher
        self._lock = threading.RLock()  # one admission or reconciliation pass at a time
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- requests -------------------------------------------------------------------------

    def submit(self, tenant: str, raw: Any, priority: int = 0, idempotency_key: str | None = None,
               body: bytes = b"") -> tuple[dict[str, Any], bool]:
        """Validate, write the record, admit. Returns (JobView, created)."""
        job_id = new_job_id()
        model = validated_job_config(raw, job_id, self.cfg.work_path)
        config = model.model_dump(mode="json", by_alias=True)
        self._check_fits(tenant, model)
        if self.launcher.embedded:  # its jobs see this filesystem: check what they will read
            from nebula.inputs import input_problems

            problems = input_problems(model)
            if problems:
                raise ConfigError("job config: bad input(s): " + "; ".join(
                    f"{p['field']}: {p['message']}" for p in problems[:3]), problems)
        cpus, gpus = queue.needs(model)
        body_hash = hashlib.sha256(body + f"|{priority}".encode()).hexdigest()
        key_hash = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
        record = {"id": job_id, "tenant": tenant, "name": config["name"], "state": "queued",
                  "priority": priority, "created_at": time.time(), "started_at": None,
                  "finished_at": None, "error": None, "attempt": 0, "config": config,
                  "cpus": cpus, "gpus": gpus, "checkpoints": [], "evals": [], "stage": None,
                  "step": 0, "total_steps": None, "ray_job_id": None}
        created, found, found_hash = self.store.create(record, key_hash, body_hash)
        if not created:
            if found_hash != body_hash:
                raise Conflict("Idempotency-Key was used before with a different request")
            rec = self.store.get(found)
            if rec is None:  # pragma: no cover - records are never deleted
                raise NotFound(found)
            return self.store.view(rec), False
        self.store.emit_state(job_id)
        self.schedule()
        return self.view(job_id), True

    def _check_fits(self, tenant: str, model: Any) -> None:
        """Refuse (ConfigError, HTTP 422) a job that could never start: more CPUs or GPUs
        than the tenant's quota, or more of any resource than the Ray cluster has in total
        (where the launcher knows that bound: the embedded Ray head), instead of a job that
        waits forever for its placement. The messages name the numbers."""
        from nebula.resources import InsufficientResources, check_capacity

        asked = queue.resources(model)
        quota = self.cfg.quota(tenant)
        why = queue.fits_at_all((asked["CPU"], asked["GPU"]), quota, model)
        if why:
            keys = [k for k, limit in (("CPU", quota.cpus), ("GPU", quota.gpus))
                    if limit is not None and asked[k] > limit + 1e-9][:1]
            raise ConfigError(f"job can never start: {why}", [{
                "field": queue.fields_asking(model, keys), "message": why, "type": "quota"}])
        capacity = self.launcher.capacity()
        if capacity is None:
            return
        try:
            check_capacity(asked, capacity, "the Ray cluster")
        except InsufficientResources as e:
            short = [k for k, v in asked.items() if v > capacity.get(k, 0.0) + 1e-9]
            raise ConfigError(f"job can never start: {e}", [{
                "field": queue.fields_asking(model, short), "message": str(e),
                "type": "capacity"}]) from None

    def get(self, job_id: str, tenant: str | None) -> dict[str, Any]:
        """The record, if `tenant` may see it (None: an admin sees all)."""
        rec = self.store.get(job_id)
        if rec is None or (tenant is not None and rec["tenant"] != tenant):
            raise NotFound(job_id)
        return rec

    def view(self, job_id: str) -> dict[str, Any]:
        rec = self.store.get(job_id)
        if rec is None:
            raise NotFound(job_id)
        return self.store.view(rec)

    def cancel(self, job_id: str) -> dict[str, Any]:
        rec = self.store.get(job_id)
        if rec is None:
            raise NotFound(job_id)
        if self.store.transition(job_id, ACTIVE, "cancelled", error="cancelled by user"):
            if rec["state"] in LAUNCHED and rec.get("ray_job_id"):
                self.launcher.stop(rec["ray_job_id"])  # SIGTERM to the job's driver
            self.store.log(job_id, "cancelled by user")
            self.schedule()  # its capacity is free now
        return self.view(job_id)

    def resume(self, job_id: str, checkpoint: str | None) -> dict[str, Any]:
        rec = self.store.get(job_id)
        if rec is None:
            raise NotFound(job_id)
        if rec["state"] not in ("failed", "cancelled"):
            raise Conflict(f"only a failed or cancelled job can be resumed; this one is "
                           f"{rec['state']}")
        ckpts = [c for c in rec.get("checkpoints") or [] if c.get("kind") == "checkpoint"]
        if checkpoint is None:
            if not ckpts:
                raise Conflict("the job has no checkpoint to resume from")
            chosen = ckpts[-1]
        else:
            match = [c for c in ckpts if checkpoint in (c["path"], c["tag"])]
            if not match:
                raise ConfigError("unknown checkpoint", [{
                    "field": "checkpoint", "type": "value_error",
                    "message": f"not a checkpoint of this job: {checkpoint!r} (known: "
                               f"{', '.join(c['tag'] for c in ckpts) or 'none'})"}])
            chosen = match[-1]
        config = dict(rec["config"])
        config["resume_from"] = chosen["path"]
        config = validate_job_config(config, job_id, self.cfg.work_path)
        if not self.store.transition(job_id, {"failed", "cancelled"}, "queued", requeue=True,
                                     config=config, attempt=int(rec.get("attempt", 0)) + 1,
                                     error=None, started_at=None, finished_at=None,
                                     ray_job_id=None):
            raise Conflict("the job changed state meanwhile; try again")
        self.store.log(job_id, f"resuming from {chosen['path']}")
        self.schedule()
        return self.view(job_id)

    # -- scheduling and reconciliation ----------------------------------------------------

    def schedule(self) -> None:
        """Start the queued jobs the quotas admit now (and retry submissions that Ray
        refused for a passing reason)."""
        with self._lock:
            active = self.store.active_records()
            for rec in active:
                retry = rec.get("submit_retry")
                if rec["state"] == "starting" and retry and retry["next"] <= time.time():
                    self._submit(rec, retry)
            for job_id in queue.admit(active, self.cfg.quota):
                rec = next(r for r in active if r["id"] == job_id)
                sid = self.launcher.ray_job_id(job_id, int(rec.get("attempt", 0)))
                # Record the Ray job id before submitting: a crash between the two leaves a
                # `starting` job that reconciliation finds missing in Ray and fails.
                if not self.store.transition(job_id, {"queued"}, "starting", ray_job_id=sid,
                                             submit_retry=None):
                    continue
                self._submit(rec, None)

    def _submit(self, rec: dict[str, Any], retry: dict[str, Any] | None) -> None:
        """Submit a `starting` job to Ray. A passing refusal (no job agent yet, Ray's HTTP
        server unreachable or busy) is retried with backoff for `submit_retry_s` (the job
        stays `starting`, so it keeps its quota); anything else, or too long, fails it."""
        job_id, attempt = rec["id"], int(rec.get("attempt", 0))
        now = time.time()
        since = retry["since"] if retry else now
        tries = retry["tries"] if retry else 0
        try:
            self.launcher.submit(job_id, attempt)
        except Exception as e:  # noqa: BLE001 - the record says why
            if tries and self.launcher.already_submitted(e):
                pass  # an earlier try reached Ray after all (its answer was lost)
            else:
                why = f"submitting to Ray failed: {e}"[:2000]
                if self.launcher.retryable(e) and now - since < self.cfg.submit_retry_s:
                    delay = min(0.5 * 2 ** tries, 10.0)
                    log.warning("%s (try %d); retrying in %.1fs: %s", job_id, tries + 1, delay, e)
                    self.store.update(job_id, submit_retry={
                        "since": since, "tries": tries + 1, "next": now + delay, "error": why})
                    self.store.log(job_id, f"[api] {why}; retrying in {delay:.1f}s")
                    return
                log.error("submitting %s to Ray failed (try %d): %s", job_id, tries + 1, e)
                if tries:
                    why += f" (gave up after {tries + 1} tries in {now - since:.0f}s)"
                self.store.transition(job_id, {"starting"}, "failed", error=why,
                                      submit_retry=None)
                return
        if retry:
            self.store.update(job_id, submit_retry=None)
            self.store.log(job_id, f"[api] submitted to Ray after {tries + 1} tries")

    def reconcile(self) -> None:
        """Fix records of launched jobs whose Ray job ended without the job saying so
        (driver killed, Ray restarted, API down while it ended)."""
        with self._lock:  # never while a job is between `starting` and its Ray submission
            self._reconcile()

    def _reconcile(self) -> None:
        changed = False
        for rec in self.store.active_records():
            if rec["state"] not in LAUNCHED or not rec.get("ray_job_id"):
                continue
            if rec.get("submit_retry"):
                continue  # not in Ray yet: schedule() retries the submission
            st = self.launcher.status(rec["ray_job_id"])
            if not st.terminal:
                continue
            if st.status == "STOPPED":
                to, error = "cancelled", "the Ray job was stopped"
            elif st.status == "SUCCEEDED":
                to, error = "failed", "the job process exited without reporting a result"
            elif st.status == "FAILED":
                to, error = "failed", f"the Ray job failed: {st.message}"
            else:
                to, error = "failed", st.message
            if self.store.transition(rec["id"], LAUNCHED, to, error=error[:4000]):
                tail = self.launcher.logs_tail(rec["ray_job_id"]) if st.status else ""
                self.store.log(rec["id"], f"[api] {error}", *tail.splitlines()[-50:])
                changed = True
        if changed:
            self.schedule()

    def start(self) -> None:
        self.store.rebuild_queues()  # records written before the queues existed, if any
        self.reconcile()
        self.schedule()
        self._thread = threading.Thread(target=self._loop, name="nebula-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self.reconcile()
                self.schedule()
            except Exception:  # noqa: BLE001 - keep scheduling; Redis/Ray may come back
                log.exception("scheduler pass failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    def launched_jobs(self) -> int:
        return sum(r["state"] in LAUNCHED for r in self.store.active_records())


__all__ = ["Conflict", "JobService", "NotFound", "TERMINAL", "validate_job_config",
           "validated_job_config"]
