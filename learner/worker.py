"""The learner: one Ray actor owning the DeepSpeed engine; it runs any registered algorithm
(`nebula.algo`) without knowing which.

GRPO step s trains exactly the groups with tickets [s*G, (s+1)*G) (see
nebula/transport/pacing.py), read from the job's Redis Stream through a consumer group;
after the optimizer step it publishes the new weights, opens the next tickets, and only
then acknowledges the groups it used (learner/online.py); offline stages (sft, dpo) and
weight publishing are here, checkpoints in learner/checkpointing.py.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

from learner.checkpointing import LearnerCheckpoints
from learner.lr_schedule import cosine_lr
from learner.online import OnlineStages
from nebula.config.job import JobConfig
from nebula.faults import maybe_crash
from nebula.transport.pacing import JobKeys
from nebula.transport.redis_client import connect


class LearnerWorker(OnlineStages, LearnerCheckpoints):
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

    def preempt(self) -> None:
        """Ask the running stage to checkpoint its current step and return (SIGTERM)."""
        self._preempt.set()

    def get_status(self) -> dict[str, Any]:
        import os

        return {**self.status, "pid": os.getpid()}

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
