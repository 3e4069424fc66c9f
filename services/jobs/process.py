"""The driver of one Nebula job inside its Ray job: `python -m services.jobs.process
--job-id ID --redis-url URL --work-dir DIR` (what the launcher submits).

It reads the job's config from its record, runs JobRunner against the Ray it was started
in and the API's Redis (so the learner's metrics stream lands where the API reads it), and
reports into the record: running, stage/step, checkpoints, evals, logs (everything printed,
including the actors' output Ray forwards), and the terminal state. SIGTERM (a cancel, from
Ray's stop_job) stops the run; the job's actors die with their driver.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from services.jobs.keys import ACTIVE, RecordKeys
from services.jobs.store import JobStore


class Cancelled(BaseException):
    """Raised in the main thread by SIGTERM (BaseException: no `except Exception` eats it)."""


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def root_cause(e: BaseException) -> str:
    """A failed job record's first line: the root cause's type and the first line of its
    message, without colour codes (the whole traceback is in the job's log). A Ray task
    error is unwrapped to the exception raised inside the actor (Nebula's own errors that
    wrap another say more than their cause, so `__cause__` chains are not followed)."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)  # ray.exceptions.RayTaskError
        if not isinstance(inner, BaseException):
            break
        e = inner
    lines = [ln.strip() for ln in ANSI.sub("", str(e)).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


class RedisLines(io.TextIOBase):
    """A text stream that also sends each complete line to the job's log stream."""

    def __init__(self, store: JobStore, job_id: str, inner: Any) -> None:
        self.store, self.job_id, self.inner = store, job_id, inner
        self._buf = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        try:
            self.inner.write(s)
        except Exception:  # noqa: BLE001 - a closed pipe must not stop the job
            pass
        with self._lock:
            self._buf += s
            *lines, self._buf = self._buf.split("\n")
        if lines:
            try:
                clean = (ANSI.sub("", line).rsplit("\r", 1)[-1][:4000] for line in lines)
                self.store.log(self.job_id, *(c for c in clean if c.strip()))
            except Exception:  # noqa: BLE001 - logs are best effort; the job goes on
                pass
        return len(s)

    def flush(self) -> None:
        try:
            self.inner.flush()
        except Exception:  # noqa: BLE001
            pass


def scan_checkpoints(ck_dir: Path) -> list[dict[str, Any]]:
    """Complete checkpoints under the job's checkpoint dir, oldest first: learner checkpoints
    (their `manifest.json` of checksums is written last) and the Hugging Face export."""
    out = []
    if not ck_dir.is_dir():
        return out
    for p in ck_dir.iterdir():
        if p.name == "export" and (p / "config.json").exists():
            kind = "export"
        elif p.is_dir() and (p / "manifest.json").exists():
            kind = "checkpoint"
        else:
            continue
        out.append({"path": str(p.resolve()), "tag": p.name, "kind": kind,
                    "time": p.stat().st_mtime})
    return sorted(out, key=lambda c: (c["kind"] == "export", c["time"]))


STAGE_NAME = re.compile(r"^[a-z_]+(\d+)$")  # sft0, grpo1, opd2, ...


def stage_index(name: str | None) -> int | None:
    m = STAGE_NAME.match(name or "")
    return int(m.group(1)) if m else None


class Reporter:
    """Writes what changed into the record: stage/step/total, checkpoints, evals. Fed by
    the runner's progress callback (the learner's status, polled while a stage trains) and
    by its own watcher thread, which catches what polling misses: a stage's end (from the
    runner's summary) and steps seen only in the learner's metrics stream. Stage/step only
    ever advance, so a late poll never shows an earlier step."""

    def __init__(self, store: JobStore, job_id: str, ck_dir: Path,
                 stage_steps: list[int] | None = None) -> None:
        self.store, self.job_id, self.ck_dir = store, job_id, ck_dir
        self.stage_steps = list(stage_steps or [])  # steps of each configured stage
        self.stage: str | None = None
        self.step = -1
        self.pos: tuple[int, int] = (-1, -1)  # (stage index, step) the record shows
        self.ended = 0  # stages of the runner's summary already written
        self.checkpoints: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self._scanned = 0.0
        self.runner: Any = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, status: dict[str, Any]) -> None:
        with self._lock:
            changed = self.set_step(status.get("stage") or None, int(status.get("step") or 0),
                                    status.get("total"))
            changed |= self.sync()
            if changed:
                self.store.emit_state(self.job_id)

    def _total(self, idx: int) -> int | None:
        return self.stage_steps[idx] if 0 <= idx < len(self.stage_steps) else None

    def set_step(self, stage: str | None, step: int, total: Any = None) -> bool:
        """Write stage/step/total if they are ahead of what the record shows."""
        idx = stage_index(stage)
        if idx is None:
            return False
        with self._lock:
            if (idx, step) <= self.pos:
                return False
            self.stage, self.step, self.pos = stage, step, (idx, step)
            total = int(total) if total else self._total(idx)
            self.store.update(self.job_id, stage=stage, step=step, total_steps=total)
            return True

    def stage_ends(self) -> bool:
        """The final step of each stage the runner has finished (its summary's stages)."""
        stages = list(self.runner.summary.get("stages", [])) if self.runner else []
        changed = False
        for res in stages[self.ended:]:
            name = res.get("stage")
            steps = res.get("steps", res.get("stopped_at"))
            idx = stage_index(name)
            if idx is not None and steps is not None:
                changed |= self.set_step(name, int(steps), self._total(idx) or steps)
        self.ended = len(stages)
        return changed

    def from_metrics(self) -> bool:
        """Stage and step from the learner's newest metrics row (its `step` counts every
        stage's steps: the stage's own step is that minus the earlier stages' steps)."""
        latest = self.store.latest_metrics(self.job_id)
        name, gstep = latest.get("stage"), latest.get("step")
        idx = stage_index(name)
        if idx is None or not isinstance(gstep, int) or idx >= len(self.stage_steps):
            return False
        step = min(max(gstep - sum(self.stage_steps[:idx]), 0), self.stage_steps[idx])
        return self.set_step(name, step, self.stage_steps[idx])

    def tick(self) -> None:
        """One watcher pass."""
        with self._lock:
            changed = self.stage_ends()
            changed |= self.from_metrics()
            changed |= self.sync()
            if changed:
                self.store.emit_state(self.job_id)

    def start(self, every_s: float = 2.0) -> None:
        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - progress is best effort
                    pass

        self._thread = threading.Thread(target=loop, name="nebula-reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def finish(self, summary: dict[str, Any]) -> None:
        """At success: every stage's end is written (the last one shows), and everything
        else found (checkpoints, evals)."""
        self.stop()
        with self._lock:
            self.stage_ends()
            self.sync(force=True)

    def sync(self, force: bool = False) -> bool:
        """Record new checkpoints and evals; True if anything changed."""
        changed = False
        with self._lock:
            if force or time.monotonic() - self._scanned > 2.0:
                self._scanned = time.monotonic()
                found = scan_checkpoints(self.ck_dir)
                if [c["path"] for c in found] != [c["path"] for c in self.checkpoints]:
                    self.checkpoints = found
                    self.store.update(self.job_id, checkpoints=found)
                    changed = True
            evals = list(self.runner.summary.get("evals", [])) if self.runner else []
            if len(evals) > len(self.evals):
                for e in evals[len(self.evals):]:
                    self.store.emit(self.job_id, "eval", e)
                self.evals = evals
                self.store.update(self.job_id, evals=evals)
                changed = True
        return changed


def _summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The small part of the runner's summary worth keeping in the record."""
    stages = [{k: v for k, v in s.items() if not isinstance(v, (list, dict))}
              for s in summary.get("stages", [])]
    out = {"stages": stages, "export": summary.get("export"), "wall_s": summary.get("wall_s")}
    if summary.get("kind") == "eval":  # an eval job: where its results are, and the totals
        out.update(results=summary.get("results"),
                   metrics=(summary.get("metrics") or {}).get("all"))
    return out


def _job_config(rec: dict[str, Any], redis_url: str) -> Any:
    from nebula.config.job import JobConfig
    from nebula.evaluation import EvalJobConfig, is_eval_config

    data = dict(rec["config"])
    model: Any = EvalJobConfig if is_eval_config(data) else JobConfig
    cluster = dict(data.get("cluster") or {})
    # This driver runs inside a Ray job: use that Ray (RAY_ADDRESS is set by Ray for it)
    # and the API's Redis, never private ones.
    cluster["ray_address"] = os.environ.get("RAY_ADDRESS") or "auto"
    cluster["redis_url"] = redis_url
    data["cluster"] = cluster
    return model.model_validate(data)


def run(job_id: str, redis_url: str, work_dir: Path) -> int:
    # A cancel can come the moment the record says "running": hold a SIGTERM that arrives
    # before the handler below is in place, and act on it inside the try (the default action
    # would kill the driver with no log line and no record update).
    early_term: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: early_term.append(signum))
    store = JobStore.from_url(redis_url)
    said: list[bool] = []

    def say_cancelled() -> None:
        # The line goes out at once, from a thread on its own connection: the main thread
        # may be anywhere (mid-way through a Redis reply, in a C call, in a teardown that
        # outlasts Ray's stop grace period) when the signal lands.
        if not said:
            said.append(True)
            line = f"job {job_id} cancelled"

            def send() -> None:
                JobStore.from_url(redis_url).log(job_id, line)
                print(line, file=sys.__stdout__, flush=True)  # the Ray job's own log

            threading.Thread(target=send, name="cancel-log").start()
    rec = store.get(job_id)
    if rec is None:
        print(f"no job record {job_id}", file=sys.stderr)
        return 2
    if not store.transition(job_id, {"starting"}, "running", error=None):
        print(f"job {job_id} is {store.get(job_id)['state']}; not running it")  # type: ignore[index]
        return 0
    work_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(work_dir)  # relative paths of the config resolve under the API's work dir
    sys.stdout = RedisLines(store, job_id, sys.__stdout__)
    sys.stderr = RedisLines(store, job_id, sys.__stderr__)

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough
        say_cancelled()
        raise Cancelled()

    signal.signal(signal.SIGTERM, on_term)
    reporter: Reporter | None = None
    try:
        if early_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            say_cancelled()
            raise Cancelled()
        cfg = _job_config(rec, redis_url)
        if rec.get("attempt", 0) > 0:
            _clear_stage_keys(store, job_id)
        from services.runner import JobRunner

        runner: Any
        if getattr(cfg, "kind", None) == "eval":  # an eval job: services/evaluate.py
            from services.evaluate import EvalRunner

            reporter = Reporter(store, job_id, Path(cfg.output_dir) / "checkpoints")
            runner = EvalRunner(cfg, job_id, progress=reporter, log=print)
        else:
            reporter = Reporter(store, job_id, Path(cfg.checkpoint.dir),
                                [int(st.steps) for st in cfg.stages])
            runner = JobRunner(cfg, job_id, progress=reporter, log=print)
        reporter.runner = runner
        reporter.start()
        summary = runner.run()
        reporter.finish(summary)
        store.transition(job_id, ACTIVE, "succeeded", result=_summary(summary))
        print(f"job {job_id} succeeded in {summary.get('wall_s', 0):.1f}s")
        return 0
    except BaseException as e:  # noqa: BLE001 - any failure ends in a failed record
        # ray.init installs its own SIGTERM handler (sys.exit(15)) over ours: a cancel that
        # lands after it arrives as that SystemExit.
        if isinstance(e, Cancelled) or (isinstance(e, SystemExit) and e.code == signal.SIGTERM):
            say_cancelled()
            if reporter:
                reporter.sync(force=True)
            store.transition(job_id, ACTIVE, "cancelled", error="cancelled")
            return 0
        traceback.print_exc()
        if reporter:
            try:
                reporter.sync(force=True)
            except Exception:  # noqa: BLE001
                pass
        store.transition(job_id, ACTIVE, "failed", error=root_cause(e))
        return 1
    finally:
        if reporter:
            reporter.stop()
        for s in (sys.stdout, sys.stderr):
            s.flush()


def _clear_stage_keys(store: JobStore, job_id: str) -> None:
    """A resumed attempt starts its RL stages' pacing (tickets, stop flag, trajectory stream)
    afresh; the previous attempt's would end them at once. Metrics and records stay."""
    import re

    own = re.compile(re.escape(RecordKeys(job_id).stage_prefix) + r"\d+:")
    keys = [k for k in store.r.scan_iter(match=RecordKeys(job_id).stage_prefix + "*", count=500)
            if own.match(k)]
    if keys:
        store.r.delete(*keys)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--work-dir", required=True, type=Path)
    a = ap.parse_args(argv)
    return run(a.job_id, a.redis_url, a.work_dir)


if __name__ == "__main__":
    sys.exit(main())
