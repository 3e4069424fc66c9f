"""The learner's online stages (`LearnerWorker`'s mixin): grpo, opd, mopd and plug-in
algorithms. Each step trains exactly the groups of its tickets, read from the job's Redis
Stream (rank 0 reads and shares them), publishes the new weights, opens the next tickets and
only then acknowledges the groups it used."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Any

from learner.checkpointing import ticket_ranges
from learner.group_metrics import group_metrics
from learner.lr_schedule import cosine_lr
from nebula.faults import maybe_crash
from nebula.transport.pacing import JobKeys, StalenessPacer

log = logging.getLogger("nebula.learner")


class VerifierFailing(RuntimeError):
    """The verifier failed on more samples than `verifier.max_error_rate` allows."""


class OnlineStages:
    """Uses the worker's cfg, engine, lead, rank, world_size, r, redis_url, status,
    global_step, replayed, fault_name, _stream, _unacked, _acked_key and _preempt, and its
    methods _share, _log, publish and (LearnerCheckpoints) _restored_tickets, _preempted,
    _ticket_state and checkpoint."""

    cfg: Any
    engine: Any
    lead: bool
    rank: int
    world_size: int
    r: Any
    redis_url: str | None
    status: dict[str, Any]
    global_step: int
    replayed: int
    fault_name: str
    _stream: Any
    _unacked: list[str]
    _acked_key: str
    _preempt: threading.Event

    def run_rl(self, stage_index: int, stage: dict[str, Any], keys_id: str) -> dict[str, Any]:
        """An online stage (grpo, opd, mopd, a plug-in's): the rollout side computed each
        group's advantages; this trains the algorithm's loss on exactly the groups of each
        step's tickets. Starts at the step the job's pacer holds (0, the checkpoint's step on
        resume, or the restored checkpoint's step after a learner restart: the groups trained
        since that checkpoint were never acknowledged, so they are read again and replayed)."""
        from learner.batch import collate
        from learner.shard import group_tokens, split_balanced
        from nebula.algo import algorithm, informative
        from nebula.transport.stream import RedisTrajectoryStream

        t_stage0 = time.monotonic()
        algo = algorithm(stage, self.cfg)
        st = algo.stage
        G = self.cfg.learner.groups_per_step
        keys = JobKeys(keys_id)
        stream = pacer = None
        if self.lead:
            stream = self._stream = RedisTrajectoryStream(self.redis_url, keys.stream)
            self._acked_key = keys.acked_steps
            pacer = StalenessPacer(self.redis_url, keys, self.cfg.async_.max_staleness, G)
        name = f"{st.type}{stage_index}"
        lc = self.cfg.learner
        self.engine.set_lr(lc.lr)
        start = self._share(pacer.steps_done() if pacer else None)
        t_pub = time.monotonic()
        self.publish(steps=start)  # the stage's starting weights, step-stamped
        setup = {"publish_s": time.monotonic() - t_pub, "setup_s": time.monotonic() - t_stage0}
        buffered: dict[int, Any] = {}
        staleness_hist: Counter[int] = Counter()
        tickets_trained = self._restored_tickets(stage_index, start)
        errors: deque[tuple[int, int]] = deque(maxlen=self.cfg.verifier.error_window)
        unscored: Any = None  # the last sample the verifier could not score
        t_stage = time.monotonic()
        samples_total = 0
        first_group_s: float | None = None
        for step in range(start, st.steps):
            self.status = {"stage": name, "step": step, "total": st.steps}
            if lc.lr_schedule == "cosine":
                self.engine.set_lr(cosine_lr(lc.lr, step, st.steps, warmup_frac=0.0))
            t_wait = time.monotonic()
            deliveries: list[Any] = []
            while True:  # rank 0 waits for the step's groups; the others wait on rank 0
                if self.lead:
                    action, deliveries = self._next_groups(name, step, stream, buffered, keys)
                    groups = [d.group for d in deliveries]
                action, groups = self._share((action, groups) if self.lead else None)
                if action != "wait":
                    break
            if action == "stop":
                return {"stage": name, "stopped_at": step}
            if action == "preempt":
                return self._preempted(name, stage_index, step, tickets_trained)
            if first_group_s is None:
                first_group_s = time.monotonic() - t_stage
            tickets_trained += [g.ticket for g in groups]
            wait_s = time.monotonic() - t_wait
            before = self.engine.version
            t0 = time.monotonic()
            useful = [g for g in groups if informative(g)]
            trained = useful if self.cfg.learner.skip_uniform_groups else groups
            if trained:  # this rank's share; a rank without one keeps the collectives going
                share = split_balanced([group_tokens(g) for g in trained],
                                       self.world_size)[self.rank]
                mine = [trained[k] for k in share]
                m = self.engine.step(collate(mine or trained[:1], self.engine.pad_id), algo,
                                     examples=len(mine), filler=not mine)
            else:  # nothing to learn from: no optimizer step, but the groups are consumed
                m = {"step_applied": 0.0}
            m["groups_trained"] = len(trained)
            step_s = time.monotonic() - t0
            maybe_crash(f"{self.fault_name}.after_step")
            if (step + 1) % self.cfg.learner.publish_every == 0 or step + 1 == st.steps:
                self.publish(steps=step + 1)
            publish_s = time.monotonic() - t0 - step_s
            if pacer is not None:
                pacer.step_published(step + 1)
            self._unacked += [d.entry_id for d in deliveries]
            samples = [s for g in groups for s in g.samples]
            stale = [before - g.min_policy_version for g in groups]
            staleness_hist.update(stale)
            samples_total += len(samples)
            m.update(algo.step_metrics(groups))
            m.update(group_metrics(groups, stale, uniform=len(groups) - len(useful)))
            bad = [s for s in samples if s.verify.status in (2, 3)]
            unscored = bad[-1] if bad else unscored
            m.update({
                "tokens_per_s": m["tokens"] / max(step_s + wait_s, 1e-9),
                "step_time_s": step_s, "wait_time_s": wait_s, "publish_time_s": publish_s,
                "samples_per_s": samples_total / (time.monotonic() - t_stage),
                "policy_version": self.engine.version, "lr": self.engine.lr,
                "stream_entries": stream.length() if stream else 0,
            })
            self.global_step += 1
            t_log = time.monotonic()
            self._log(self.global_step, name, m)
            m["log_time_s"] = time.monotonic() - t_log
            self.status = {"stage": name, "step": step + 1, "total": st.steps, **m}
            errors.append((len(bad), len(samples)))
            self._check_error_rate(errors, unscored)
            ck = self.cfg.checkpoint
            if ck and ck.interval and (step + 1) % ck.interval == 0 and step + 1 < st.steps:
                self.checkpoint(f"{name}-step{step + 1}", stage_index, step + 1, False,
                                self._ticket_state(tickets_trained))
        path = self.checkpoint(f"{name}-end", stage_index, st.steps, True,
                               self._ticket_state(tickets_trained))
        self._stream = None
        return {"stage": name, "steps": st.steps, "final_version": self.engine.version,
                "checkpoint": path,
                "staleness_hist": {str(k): v for k, v in sorted(staleness_hist.items())},
                "samples": samples_total, "wall_s": time.monotonic() - t_stage,
                "tickets_trained": ticket_ranges(tickets_trained),
                "tickets_trained_n": len(tickets_trained), "first_batch_s": first_group_s,
                "stream_entries_end": stream.length() if stream else 0,
                "stream_pending_end": stream.pending() if stream else 0,
                "replayed": self.replayed,
                **setup}

    def _next_groups(self, name: str, step: int, stream: Any, buffered: dict[int, Any],
                     keys: JobKeys) -> tuple[str, list[Any]]:
        """Rank 0: ("train", the deliveries of step's tickets), ("stop"|"preempt", []), or
        ("wait", []) after a minute without them (logged: never a silent wait; and the other
        ranks, blocked on this answer, hear from rank 0 well within their collective
        timeout)."""
        G = self.cfg.learner.groups_per_step
        want = set(range(step * G, (step + 1) * G))
        t_wait = time.monotonic()
        while not want <= buffered.keys():
            if self._preempt.is_set():
                return "preempt", []
            for d in stream.read("learner-0", 4 * G, block_ms=500):
                self._take(d, step * G, buffered, stream)
            if self.r.exists(keys.stop):
                return "stop", []
            if time.monotonic() - t_wait > 60:
                log.warning("%s step %d: waiting for tickets %s from the rollout workers",
                            name, step, sorted(want - buffered.keys())[:8])
                return "wait", []
        if self._preempt.is_set():
            return "preempt", []
        return "train", [buffered.pop(t) for t in sorted(want)]

    def _take(self, d: Any, first_untrained: int, buffered: dict[int, Any], stream: Any
              ) -> None:
        """File one delivered entry under its ticket, or drop a copy that must not train:
        an entry this learner already holds (re-delivered after sitting idle), an entry of a
        ticket a checkpoint already holds (replayed after a crash between checkpoint and
        acknowledgement) or a second entry of one ticket (acknowledged, never trained)."""
        t = d.group.ticket
        if d.entry_id in self._unacked or (t in buffered and buffered[t].entry_id == d.entry_id):
            return
        if t < first_untrained or t in buffered:
            stream.ack([d.entry_id])
            return
        buffered[t] = d
        self.replayed += d.redelivered

    def _check_error_rate(self, errors: deque[tuple[int, int]], sample: Any) -> None:
        """Stop the job when the verifier fails on too many samples of the last steps."""
        if len(errors) < (errors.maxlen or 1):
            return
        bad, total = sum(e for e, _ in errors), sum(n for _, n in errors)
        limit = self.cfg.verifier.max_error_rate
        if total and bad / total > limit:
            v = sample.verify
            kind = {2: "error", 3: "timeout"}.get(v.status, "error")
            raise VerifierFailing(
                f"verifier {v.verifier or '?'!r} could not score {bad} of the {total} samples "
                f"of the last {len(errors)} learner steps ({bad / total:.0%} > "
                f"verifier.max_error_rate {limit:.0%}); a sample's {kind}: {v.reason[:300]!r}")
