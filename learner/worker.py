"""The learner: one Ray actor owning the DeepSpeed engine; it runs any registered algorithm
(`nebula.algo`) without knowing which.

GRPO step s trains exactly the groups with tickets [s*G, (s+1)*G) (see
nebula/transport/pacing.py), read from the job's Redis Stream through a consumer group;
after the optimizer step it publishes the new weights, opens the next tickets, and only
then acknowledges the groups it used.
"""

from __future__ import annotations

from nebula.transport.redis_client import connect

import logging
import random
import threading
import time
from collections import deque
from collections import Counter
from pathlib import Path
from typing import Any

from nebula.config.job import JobConfig
from nebula.faults import maybe_crash
from learner.checkpointing import LearnerCheckpoints, ticket_ranges
from learner.group_metrics import group_metrics
from nebula.transport.pacing import JobKeys, StalenessPacer

log = logging.getLogger("nebula.learner")


def cosine_lr(peak: float, step: int, total: int, warmup_frac: float = 0.05,
           floor_frac: float = 0.1) -> float:
    """Linear warm-up over the first 5% of steps (none with warmup_frac 0), then cosine decay
    towards 10% of the peak at the last step (SFT stages; RL stages with lr_schedule cosine)."""
    import math

    warm = max(1, int(total * warmup_frac)) if warmup_frac > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class VerifierFailing(RuntimeError):
    """The verifier failed on more samples than `verifier.max_error_rate` allows."""


class LearnerWorker(LearnerCheckpoints):
    """One data-parallel rank of the learner (`services.learner_group`): construct, then
    `setup` (the rendezvous and the DeepSpeed engine). Every rank runs every call; rank 0
    reads the stream, paces, publishes, acknowledges and logs, and broadcasts each step's
    groups to the others, which train their `learner.shard` share."""

    def __init__(self, job: dict[str, Any], job_id: str, redis_url: str | None,
                 weight_store: Any, incarnation: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        from nebula.logfiles import redirect_to_log_file

        redirect_to_log_file((f"learner-r{incarnation}" if incarnation else "learner")
                             + (f"-rank{rank}" if rank else ""))
        from nebula.cpu_binding import apply_cpu_binding

        apply_cpu_binding("learner")
        self.cfg = JobConfig.model_validate(job)
        from nebula.checkpoints import job_fingerprint

        self._fingerprint = job_fingerprint(self.cfg)  # what a resume must share with this job
        self.job_id, self.redis_url = job_id, redis_url
        self.rank, self.world_size, self.lead = rank, world_size, rank == 0
        self.incarnation = incarnation  # 0, then 1, 2, ... for each restart after a death
        # Fault-drill sites: "learner.<site>", then "learner-r1.<site>" in the first restart
        # ...; rank k > 0 of a group: "learner-rank<k>.<site>".
        self.fault_name = (f"learner-r{incarnation}" if incarnation else "learner") \
            + (f"-rank{rank}" if rank else "")
        self.r = connect(redis_url) if redis_url and self.lead else None
        self.store = weight_store
        self.engine: Any = None
        self.metrics: Any = None
        self.global_step = 0
        self.pusher: Any = None  # NcclWeightPusher once rollouts are attached (GPU)
        self._published = -1
        self._published_steps = -1
        self._published_ref: Any = None
        self.status: dict[str, Any] = {"stage": "", "step": 0, "total": 0}
        # Where a restore left the job (stage, step, tickets trained in that stage so far).
        self.restored: dict[str, Any] = {}
        # Set by `preempt` (another thread of this actor): the running stage checkpoints its
        # current step and returns.
        self._preempt = threading.Event()
        # Trajectory entries trained since the last checkpoint: acknowledged only once a
        # checkpoint holds their effect, so a learner that dies replays them from Redis.
        self._unacked: list[str] = []
        self._stream: Any = None
        self.replayed = 0  # groups read again after a restart (trained since a checkpoint)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address and a free port of its node, where the ranks meet."""
        import ray

        from nebula.service_process import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master: tuple[str, int] | None = None) -> int:
        """Join the ranks' process group at `master` (None: a single rank) and build the
        DeepSpeed engine; returns this rank."""
        import os

        from learner.ds_engine import DSLearnerEngine

        # Rendezvous variables inherited from the process that started Ray (a test run, a
        # shell) would point at a port already in use: this group's own, or none (one rank).
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
        if master is not None:
            os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                              LOCAL_RANK="0",  # Ray shows each rank only its own GPU(s)
                              MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        self.engine = DSLearnerEngine(self.cfg.model.path, self.cfg.learner,
                                      dtype=self.cfg.model.dtype,
                                      temperature=self.cfg.rollout.temperature or 1.0,
                                      reference=self.cfg.learner.kl.coef > 0)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.path)
        if self.lead:
            from learner.metrics import MetricsSink

            from nebula.trackers import open_trackers

            self.metrics = MetricsSink(Path(self.cfg.output_dir), self.redis_url,
                                       JobKeys(self.job_id).metrics,
                                       trackers=open_trackers(self.cfg, self.job_id))
        return self.rank

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        """An eval row to the experiment trackers (one run per job: the learner's)."""
        if self.metrics is not None:
            self.metrics.log_eval(step, scalars)

    def _share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others pass None)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.lead else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _log(self, step: int, stage: str, m: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(step, stage, m)

    # -- weights ------------------------------------------------------------------------

    def publish(self, steps: int = -1) -> int:
        """Put the current weights in Ray's object store and announce their version and the
        number of learner steps of the current stage they include (-1 outside a stage)."""
        import ray

        version = self.engine.version
        if version == self._published and steps == self._published_steps:
            return version
        ref, fp = None, None
        if self.pusher is not None:  # GPU: broadcast into the engines; no blob to fetch
            if version != self._published:
                self.pusher.push(version)
        elif version != self._published:
            # Rank 0 holds the full weights (ZeRO-1/2); under ZeRO-3 every rank takes part in
            # gathering them.
            if self.lead or self.engine.zero_stage == 3:
                blob = self.engine.state_dict_blob()
                if self.lead:
                    from nebula.weight_check import blob_fingerprint

                    # the engines check what they fetched against it before loading it
                    ref, fp = ray.put(blob), blob_fingerprint(blob)
        else:
            ref = self._published_ref  # re-published: the store keeps its fingerprint
        if self.lead:
            ray.get(self.store.publish.remote(version, [ref] if ref is not None else [], steps,
                                              fp))
            if self.r is not None:
                self.r.set(JobKeys(self.job_id).version, version)
        self._published_ref, self._published_steps = ref, steps
        self._published = version
        return version

    def attach_rollouts(self, rollouts: list[Any]) -> str:
        """Open an NCCL weight-sync group with each rollout engine (weight_sync nccl)."""
        from learner.weight_sync import NcclWeightPusher, nccl_available

        if not self.lead:  # rank 0 alone sends (every rank holds the full weights, ZeRO<=2)
            return "nccl"
        if not nccl_available(str(self.engine.device)):
            raise RuntimeError(f"learner.weight_sync nccl: the learner runs on "
                               f"{self.engine.device}, NCCL needs a CUDA device")
        self.pusher = NcclWeightPusher(self._gpu_state, rollouts)
        self._published = -1  # the engines hold the initial checkpoint; push on next publish
        return "nccl"

    def _gpu_state(self) -> dict[str, Any]:
        """Full HF-named weights on the learner's device, for the NCCL broadcast."""
        return self.engine.full_state_dict(device=self.engine.device)

    # -- offline stages (sft, dpo, ...) ------------------------------------------------------

    def run_offline(self, stage_index: int, stage: dict[str, Any], start_step: int = 0
                    ) -> dict[str, Any]:
        """An offline stage: `batch_size` of the algorithm's examples per optimizer step, in a
        seeded order reshuffled every epoch (replayed up to `start_step` on resume), with the
        stage's cosine learning-rate schedule. Work the algorithm does once before the first
        step (DPO's reference log-probs) is cached beside the checkpoints, so a resumed stage
        uses the starting policy's values, not the current one's."""
        import json

        from learner.batch import collate_examples
        from learner.shard import example_tokens, split_balanced
        from nebula.algo import algorithm

        algo = algorithm(stage, self.cfg)
        examples = algo.examples(self.tokenizer)
        name = f"{algo.type_name()}{stage_index}"
        ck = self.cfg.checkpoint
        assert ck is not None
        cache = Path(ck.dir) / f"{name}-prepared.json"
        if cache.is_file():
            for e, refs in zip(examples, json.loads(cache.read_text())):
                e.ref_logprob_sums = refs
        t0 = time.monotonic()
        algo.prepare(examples, self.engine.sequence_logprobs)
        prepared = [e.ref_logprob_sums for e in examples]
        if any(r is not None for r in prepared) and not cache.is_file() and self.lead:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(prepared))
            tmp.replace(cache)
        prepare_s = time.monotonic() - t0
        held_out = {}
        if start_step == 0:
            held_out["before"] = algo.held_out(self.tokenizer, self.engine.sequence_logprobs)
        rng = random.Random(self.cfg.seed + stage_index)
        steps, size = algo.stage.steps, algo.batch_size
        self.status = {"stage": name, "step": 0, "total": steps}
        order: list[int] = []
        last: dict[str, Any] = {}
        for step in range(steps):
            if len(order) < size:
                perm = list(range(len(examples)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[:size], order[size:]
            if step < start_step:  # resumed: replay the data order up to the checkpoint
                continue
            if self._share(self._preempt.is_set()):  # rank 0's decision, on every rank
                return self._preempted(name, stage_index, step, None)
            self.engine.set_lr(cosine_lr(algo.lr, step, steps))
            t0 = time.monotonic()
            share = split_balanced([example_tokens(examples[i]) for i in idx],
                                   self.world_size)[self.rank]
            mine = [examples[idx[k]] for k in share]
            batch = collate_examples(mine or [examples[idx[0]]], self.engine.pad_id)
            m = self.engine.step(batch, algo, examples=len(mine), filler=not mine)
            m["step_time_s"] = time.monotonic() - t0
            maybe_crash(f"{self.fault_name}.after_offline_step")
            self.global_step += 1
            self._log(self.global_step, name, m)
            self.status = {"stage": name, "step": step + 1, "total": steps, **m}
            last = m
            if ck.interval and (step + 1) % ck.interval == 0 and step + 1 < steps:
                self.checkpoint(f"{name}-step{step + 1}", stage_index, step + 1, False)
        path = self.checkpoint(f"{name}-end", stage_index, steps, True)
        held_out["after"] = algo.held_out(self.tokenizer, self.engine.sequence_logprobs)
        return {"stage": name, "steps": steps, "final_loss": last.get("loss"),
                "final": {k: v for k, v in last.items() if isinstance(v, float)},
                "prepare_s": prepare_s, "checkpoint": path,
                **({"held_out": held_out} if held_out["after"] else {})}

    # -- online stages (grpo, opd, mopd, ...) --------------------------------------------

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

    def preempt(self) -> None:
        """Ask the running stage to checkpoint its current step and return (SIGTERM)."""
        self._preempt.set()

    def get_status(self) -> dict[str, Any]:
        import os

        return {**self.status, "pid": os.getpid()}

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
