"""Checkpoints of the learner (`LearnerWorker`'s mixin): DeepSpeed state plus where the job
is (stage, step, the tickets the checkpoint's lineage trained), the acknowledgement of the
groups a checkpoint holds, restore after a death or on resume, and the Hugging Face export.
Collective with several ranks (every rank saves and loads its ZeRO partitions); rank 0
acknowledges, trims the stream and prunes old checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("nebula.learner")


def ticket_ranges(tickets: list[int]) -> list[list[int]]:
    """Tickets as sorted half-open [start, end) runs: a 500-step stage of 128 groups is one
    pair, not 64,000 ints in summary.json. A ticket trained twice shows up as a count
    (`tickets_trained_n`) larger than the ranges cover."""
    runs: list[list[int]] = []
    for t in sorted(set(tickets)):
        if runs and runs[-1][1] == t:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1])
    return runs


class LearnerCheckpoints:
    """Uses the worker's cfg, engine, store, lead, r, global_step, restored, _stream, _unacked,
    _acked_key and _fingerprint."""

    cfg: Any
    engine: Any
    store: Any
    lead: bool
    r: Any
    global_step: int
    restored: dict[str, Any]
    _stream: Any
    _unacked: list[str]
    _acked_key: str
    _fingerprint: dict[str, Any]

    def _ticket_state(self, tickets: list[int]) -> dict[str, Any]:
        return {"tickets_trained": ticket_ranges(tickets), "tickets_trained_n": len(tickets)}

    def _restored_tickets(self, stage_index: int, start: int) -> list[int]:
        """Tickets the restored checkpoint's lineage already trained in this stage: the
        stage's record counts each ticket once across learner restarts and resumes."""
        st = self.restored
        if start == 0 or int(st.get("stage_index", -1)) != stage_index \
                or int(st.get("stage_step", -1)) != start:
            return []
        out = [t for a, b in st.get("tickets_trained", []) for t in range(a, b)]
        extra = int(st.get("tickets_trained_n", len(out))) - len(out)
        return out + out[:extra]  # a ticket trained twice stays counted twice

    def _preempted(self, name: str, stage_index: int, step: int, tickets: list[int] | None
                   ) -> dict[str, Any]:
        path = self.checkpoint(f"{name}-step{step}", stage_index, step, False,
                               self._ticket_state(tickets) if tickets is not None else None)
        log.warning("%s: preempted at step %d; checkpoint %s", name, step, path)
        return {"stage": name, "preempted_at": step, "checkpoint": path}

    # -- checkpoints --------------------------------------------------------------------

    def checkpoint(self, tag: str, stage_index: int, stage_step: int, stage_done: bool,
                   extra: dict[str, Any] | None = None) -> str:
        """Model, optimizer, policy version and where the job is (stage, step in it) under
        checkpoint.dir/<tag>; `restore` reads it back."""
        ck = self.cfg.checkpoint
        assert ck is not None
        path = Path(ck.dir) / tag
        where = {"stage_index": stage_index, "stage_step": stage_step,
                 "stage_done": stage_done, "global_step": self.global_step,
                 "version": self.engine.version, "tag": tag}
        self.engine.save_checkpoint(str(path), {**(extra or {}), **where},
                                    manifest={"job": self._fingerprint, **where})
        if self._stream is not None and self._unacked:  # rank 0
            # The checkpoint holds these groups' effect now: acknowledge them, and drop from
            # the stream every entry acknowledged so far (pending ones stay).
            self._stream.ack(self._unacked)
            self._unacked = []
            if not stage_done:  # a finished stage's last groups stay readable (bounded:
                self._stream.trim()  # one checkpoint interval); mid-stage, drop the trained
            self.r.set(self._acked_key, stage_step)
        if self.lead:
            from nebula.checkpoints import prune

            prune(ck.dir, ck.keep, log.warning)
        return str(path)

    def restore(self, path: str | None, in_job: bool = False) -> dict[str, Any]:
        """Load a `checkpoint` dir (model, optimizer, version); returns where the job was.

        in_job: this learner replaces one that died in the same job. Its policy versions go
        on above the newest the dead one published, so rollout engines load the restored
        weights instead of keeping the dead learner's under the same version number."""
        import ray

        state = self.engine.load_checkpoint(path) if path else {}  # None: the initial model
        self.global_step = int(state.get("global_step", 0))
        if in_job:
            published = int(ray.get(self.store.latest.remote())[0])
            self.engine.version = max(self.engine.version, published + 1)
            state["version"] = self.engine.version
        self.restored = state
        return state

    def export(self, subdir: str = "export") -> str:
        ck = self.cfg.checkpoint
        assert ck is not None
        out = Path(ck.dir) / subdir
        self.engine.export_hf(str(out))
        return str(out)
