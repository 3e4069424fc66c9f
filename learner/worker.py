"""The learner: one Ray actor owning the DeepSpeed engine; it runs any registered algorithm
(`nebula.algo`) without knowing which.

GRPO step s trains exactly the groups with tickets [s*G, (s+1)*G) (see
nebula/transport/pacing.py), read from the job's Redis Stream through a consumer group;
after the optimizer step it publishes the new weights, opens the next tickets, and only
then acknowledges the groups it used.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nebula.config.job import JobConfig
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


class LearnerWorker:
    def __init__(self, job: dict[str, Any], job_id: str, redis_url: str | None,
                 weight_store: Any) -> None:
        import os

        import redis

        from learner.ds_engine import DSLearnerEngine

        # This actor is a single-process learner: rendezvous variables inherited from the
        # process that started Ray (a test run, a shell) would point at a port already in use.
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
        from nebula.cpu_binding import apply_cpu_binding

        apply_cpu_binding("learner")
        from learner.metrics import MetricsSink

        self.cfg = JobConfig.model_validate(job)
        self.job_id, self.redis_url = job_id, redis_url
        self.r = redis.Redis.from_url(redis_url) if redis_url else None
        self.store = weight_store
        self.engine = DSLearnerEngine(self.cfg.model.path, self.cfg.learner,
                                      dtype=self.cfg.model.dtype,
                                      temperature=self.cfg.rollout.temperature or 1.0,
                                      reference=self.cfg.learner.kl.coef > 0)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.path)
        self.metrics = MetricsSink(Path(self.cfg.output_dir), redis_url,
                                   JobKeys(job_id).metrics)
        self.global_step = 0
        self.pusher: Any = None  # NcclWeightPusher once rollouts are attached (GPU)
        self._published = -1
        self._published_steps = -1
        self._published_ref: Any = None
        self.status: dict[str, Any] = {"stage": "", "step": 0, "total": 0}

    # -- weights ------------------------------------------------------------------------

    def publish(self, steps: int = -1) -> int:
        """Put the current weights in Ray's object store and announce their version and the
        number of learner steps of the current stage they include (-1 outside a stage)."""
        import ray

        version = self.engine.version
        if version == self._published and steps == self._published_steps:
            return version
        if self.pusher is not None:  # GPU: broadcast into the engines; no blob to fetch
            if version != self._published:
                self.pusher.push(version)
            ref = None
        else:
            ref = ray.put(self.engine.state_dict_blob()) if version != self._published \
                else self._published_ref
        ray.get(self.store.publish.remote(version, [ref] if ref is not None else [], steps))
        self._published_ref, self._published_steps = ref, steps
        if self.r is not None:
            self.r.set(JobKeys(self.job_id).version, version)
        self._published = version
        return version

    def attach_rollouts(self, rollouts: list[Any], tp_size: int = 1) -> str:
        """Open an NCCL weight-sync group with each rollout engine (weight_sync nccl)."""
        from learner.weight_sync import NcclWeightPusher, nccl_available

        if not nccl_available(str(self.engine.device)):
            raise RuntimeError(f"learner.weight_sync nccl: the learner runs on "
                               f"{self.engine.device}, NCCL needs a CUDA device")
        self.pusher = NcclWeightPusher(self._gpu_state, rollouts, tp_size)
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
        if any(r is not None for r in prepared) and not cache.is_file():
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
            self.engine.set_lr(cosine_lr(algo.lr, step, steps))
            t0 = time.monotonic()
            batch = collate_examples([examples[i] for i in idx], self.engine.pad_id)
            m = self.engine.step(batch, algo, examples=len(idx))
            m["step_time_s"] = time.monotonic() - t0
            self.global_step += 1
            self.metrics.log(self.global_step, name, m)
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
        step's tickets. Starts at the step the job's pacer holds (0, or the checkpoint's step
        on resume)."""
        from learner.batch import collate
        from nebula.algo import algorithm, informative
        from nebula.transport.stream import RedisTrajectoryStream

        t_stage0 = time.monotonic()
        algo = algorithm(stage, self.cfg)
        st = algo.stage
        G = self.cfg.learner.groups_per_step
        keys = JobKeys(keys_id)
        stream = RedisTrajectoryStream(self.redis_url, keys.stream)
        pacer = StalenessPacer(self.redis_url, keys, self.cfg.async_.max_staleness, G)
        name = f"{st.type}{stage_index}"
        lc = self.cfg.learner
        self.engine.set_lr(lc.lr)
        t_pub = time.monotonic()
        self.publish(steps=pacer.steps_done())  # the stage's starting weights, step-stamped
        setup = {"publish_s": time.monotonic() - t_pub, "setup_s": time.monotonic() - t_stage0}
        buffered: dict[int, Any] = {}
        staleness_hist: Counter[int] = Counter()
        tickets_trained: list[int] = []
        t_stage = time.monotonic()
        samples_total = 0
        first_group_s: float | None = None
        for step in range(pacer.steps_done(), st.steps):
            self.status = {"stage": name, "step": step, "total": st.steps}
            if lc.lr_schedule == "cosine":
                self.engine.set_lr(cosine_lr(lc.lr, step, st.steps, warmup_frac=0.0))
            want = set(range(step * G, (step + 1) * G))
            t_wait = time.monotonic()
            while not want <= buffered.keys():
                for d in stream.read("learner-0", 4 * G, block_ms=500):
                    if d.group.ticket in buffered:  # a regenerated duplicate cannot happen,
                        stream.ack([d.entry_id])  # but never train twice on a ticket
                        continue
                    buffered[d.group.ticket] = d
                if self.r.exists(keys.stop):
                    return {"stage": name, "stopped_at": step}
            if first_group_s is None:
                first_group_s = time.monotonic() - t_stage
            deliveries = [buffered.pop(t) for t in sorted(want)]
            groups = [d.group for d in deliveries]
            tickets_trained += [g.ticket for g in groups]
            wait_s = time.monotonic() - t_wait
            before = self.engine.version
            t0 = time.monotonic()
            useful = [g for g in groups if informative(g)]
            trained = useful if self.cfg.learner.skip_uniform_groups else groups
            if trained:
                m = self.engine.step(collate(trained, self.engine.pad_id), algo,
                                     examples=len(trained))
            else:  # nothing to learn from: no optimizer step, but the groups are consumed
                m = {"step_applied": 0.0}
            m["groups_trained"] = len(trained)
            step_s = time.monotonic() - t0
            if (step + 1) % self.cfg.learner.publish_every == 0 or step + 1 == st.steps:
                self.publish(steps=step + 1)
            publish_s = time.monotonic() - t0 - step_s
            pacer.step_published(step + 1)
            stream.ack([d.entry_id for d in deliveries])
            rewards = [s.reward for g in groups for s in g.samples]
            passed = [s.verify.passed for g in groups for s in g.samples]
            stale = [before - g.min_policy_version for g in groups]
            staleness_hist.update(stale)
            lengths = [len(s.completion_ids) for g in groups for s in g.samples]
            tokens = sum(lengths)
            samples_total += len(rewards)
            m.update(algo.step_metrics(groups))
            if any(s.turns > 1 or s.tool_calls for g in groups for s in g.samples):
                m["turns_mean"] = sum(s.turns for g in groups for s in g.samples) / len(lengths)
                m["tool_calls_mean"] = sum(s.tool_calls for g in groups
                                           for s in g.samples) / len(lengths)
            m.update({
                "reward_mean": sum(rewards) / len(rewards),
                "pass_rate": sum(passed) / len(passed),
                # samples the verifier could not score: out of the loss (rollout/groups.py)
                "verifier_errors": sum(s.verify.status == 2 for g in groups for s in g.samples),
                "verifier_timeouts": sum(s.verify.status == 3 for g in groups
                                         for s in g.samples),
                # episodes the environment failed (an unreadable tool call): out of the loss
                "env_errors": sum(bool(s.env_error) for g in groups for s in g.samples),
                # dynamic sampling: groups generated again from a fresh prompt
                "refills": sum(g.refills for g in groups),
                "uniform_groups": len(groups) - len(useful),
                "staleness_max": max(stale), "staleness_mean": sum(stale) / len(stale),
                "completion_len_mean": tokens / len(lengths),
                "truncation_rate": sum(s.truncated for g in groups for s in g.samples)
                / len(lengths),
                "tokens": tokens, "tokens_per_s": tokens / max(step_s + wait_s, 1e-9),
                "step_time_s": step_s, "wait_time_s": wait_s, "publish_time_s": publish_s,
                "samples_per_s": samples_total / (time.monotonic() - t_stage),
                "policy_version": self.engine.version, "lr": self.engine.lr,
            })
            self.global_step += 1
            t_log = time.monotonic()
            self.metrics.log(self.global_step, name, m)
            m["log_time_s"] = time.monotonic() - t_log
            self.status = {"stage": name, "step": step + 1, "total": st.steps, **m}
            ck = self.cfg.checkpoint
            if ck and ck.interval and (step + 1) % ck.interval == 0 and step + 1 < st.steps:
                self.checkpoint(f"{name}-step{step + 1}", stage_index, step + 1, False,
                                {"stream_last_id": deliveries[-1].entry_id})
        path = self.checkpoint(f"{name}-end", stage_index, st.steps, True)
        return {"stage": name, "steps": st.steps, "final_version": self.engine.version,
                "checkpoint": path,
                "staleness_hist": {str(k): v for k, v in sorted(staleness_hist.items())},
                "samples": samples_total, "wall_s": time.monotonic() - t_stage,
                "tickets_trained": ticket_ranges(tickets_trained),
                "tickets_trained_n": len(tickets_trained), "first_batch_s": first_group_s, **setup}

    # -- checkpoints --------------------------------------------------------------------

    def checkpoint(self, tag: str, stage_index: int, stage_step: int, stage_done: bool,
                   extra: dict[str, Any] | None = None) -> str:
        """Model, optimizer, policy version and where the job is (stage, step in it) under
        checkpoint.dir/<tag>; `restore` reads it back."""
        ck = self.cfg.checkpoint
        assert ck is not None
        path = Path(ck.dir) / tag
        self.engine.save_checkpoint(str(path), {
            **(extra or {}), "stage_index": stage_index, "stage_step": stage_step,
            "stage_done": stage_done, "global_step": self.global_step,
            "version": self.engine.version, "tag": tag})
        kept = sorted((p for p in Path(ck.dir).iterdir() if p.is_dir() and p.name != "export"),
                      key=lambda p: p.stat().st_mtime)
        for old in kept[:-ck.keep]:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
        return str(path)

    def restore(self, path: str) -> dict[str, Any]:
        """Load a `checkpoint` dir (model, optimizer, version); returns where the job was."""
        state = self.engine.load_checkpoint(path)
        self.global_step = int(state.get("global_step", 0))
        return state

    def export(self, subdir: str = "export") -> str:
        ck = self.cfg.checkpoint
        assert ck is not None
        out = Path(ck.dir) / subdir
        self.engine.export_hf(str(out))
        return str(out)

    def get_status(self) -> dict[str, Any]:
        return dict(self.status)

    def close(self) -> None:
        self.metrics.close()
