"""A rollout worker: one Ray actor owning one generation engine.

Loop: reserve tickets under the staleness bound -> load the newest weights -> generate n
samples per prompt with behaviour log-probs -> score them on the verifier service ->
(opd/mopd: teacher log-probs of every sampled token from the teacher service) ->
advantages -> write each group to the job's Redis Stream. Reserved tickets
are recorded in Redis before generation and removed atomically with the group's XADD, so
a worker that crashes and is restarted by Ray generates its unfinished groups again and
never loses or duplicates a finished one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from nebula.algo import Algorithm, algorithm, informative
from nebula.config.job import JobConfig
from nebula.faults import maybe_crash, maybe_raise
from nebula.transport.pacing import JobKeys, StalenessPacer, ticket_step
from nebula.transport.redis_client import connect
from rollout.nccl_receiver import NcclWeightReceiver

log = logging.getLogger("nebula.rollout")


def _restarted_by_ray() -> bool:
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not inside a Ray actor (unit tests)
        return False


class RolloutWorker(NcclWeightReceiver):
    def __init__(self, job: dict[str, Any], job_id: str, index: int, redis_url: str,
                 verifier_address: str, weight_store: Any,
                 teacher_address: str | None = None) -> None:
        from nebula.logfiles import redirect_to_log_file

        redirect_to_log_file(f"rollout-{index}")

        from rollout.factory import make_engine
        from nebula.prompts import PromptOrder, load_prompt_rows
        from nebula.clients.verifier import VerifierClient

        from nebula.cpu_binding import apply_cpu_binding

        apply_cpu_binding("rollout")
        self.cfg = JobConfig.model_validate(job)
        self.job_id, self.index = job_id, index
        self.name = f"rollout-{index}"
        self.keys = JobKeys(job_id)  # replaced per stage by run()
        self.redis_url = redis_url
        self.r = connect(redis_url)
        self.store = weight_store
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.path)
        self.engine = make_engine(self.cfg, seed=self.cfg.seed + 1000 * index)
        from rollout.weight_loader import WeightLoader

        self.weights = WeightLoader(weight_store, self.engine, name=self.name)
        # NCCL updates (GPU): the open update's token and its watchdog (see start_weight_update)
        self._update_mutex = threading.Lock()
        self._update: Any = None
        self._update_timer: threading.Timer | None = None
        from nebula.prompts import context_len
        from rollout.episodes import EpisodeRunner

        # Every sample is an episode of the job's environment (one engine call per batch for
        # single-turn ones, as before).
        self.episodes = EpisodeRunner(self.engine, self.tokenizer, self.cfg.rollout.environment,
                                      context_len(self.cfg.model))
        self.rows = [r for d in self.cfg.datasets.train
                     for r in load_prompt_rows(d, self.tokenizer)]
        for i, r in enumerate(self.rows):
            r.index = i  # a stable id across several training files
        self.order = PromptOrder(self.rows, self.cfg.seed)
        self.verifier = VerifierClient(verifier_address, timeout_s=600)
        self.teacher_address = teacher_address
        self.scorer: Any = None  # a TeacherScorer during stages with teachers (opd/mopd)
        self.algo: Algorithm | None = None  # the current stage's
        self.loaded_steps = -1
        self.restarted = _restarted_by_ray()  # a restart is never crashed again by a drill
        # Held from weight sync to the end of generation, so an evaluation running beside the
        # training loop (max_concurrency 2) cannot swap weights under a batch being tagged.
        self._engine_lock = threading.Lock()
        # The first generate call of an engine is several times slower (allocations,
        # kernel selection): pay it now, not inside the first training step.
        self.engine.generate([self.rows[0].prompt_ids], 2, 1.0, 1.0, 2)
        # busy_s: generation, weight loads and waits on the previous batch's finish (scoring,
        # stream writes: finish_s, beside generation); pacing waits are counted apart.
        self.stats = {"groups": 0, "samples": 0, "tokens": 0, "gen_s": 0.0, "verify_s": 0.0,
                      "weight_load_s": 0.0, "weight_fetch_s": 0.0, "weight_loads": 0,
                      "regenerated": 0, "busy_s": 0.0, "pacing_wait_s": 0.0,
                      "finish_s": 0.0, "finish_wait_s": 0.0}

    # -- weights ------------------------------------------------------------------------

    def sync_weights(self, min_steps: int | None = None) -> int:
        """Load the newest published weights if the engine's are older; returns the version.

        With min_steps, keep the loaded weights while they include at least min_steps
        learner steps of the current stage: the staleness bound only needs that much, and
        every load costs a pause of the engine.

        Every fetch times out (`NEBULA_WEIGHT_SYNC_TIMEOUT_S`); a blob whose fingerprint is
        not the published one is refused, and a load the engine does not verifiably hold
        raises. Each raises `WeightSyncError`, and until a later load is verified the
        engine is not used (the next sync loads the newest weights again).
        """
        if (self.weights.error is None and min_steps is not None
                and self.loaded_steps >= min_steps):
            return self.engine.version
        version, ref, steps, fingerprint = self.weights.latest()
        if ref and (version > self.engine.version or self.weights.error is not None):
            t0 = time.monotonic()
            blob = self.weights.fetch(ref[0], version)
            t1 = time.monotonic()
            self.weights.load(blob, version, fingerprint)
            self.stats["weight_loads"] += 1
            self.stats["weight_fetch_s"] += t1 - t0
            self.stats["weight_load_s"] += time.monotonic() - t0
        self.weights.check_usable()
        if version == self.engine.version:
            self.loaded_steps = steps
        return self.engine.version

    # -- GRPO ---------------------------------------------------------------------------

    def run(self, stage: str, keys_id: str, stage_cfg: dict[str, Any]) -> dict[str, Any]:
        """Generate groups of an online stage (grpo, opd, mopd, a plug-in's) for tickets
        [0, steps * G) until they are all taken."""
        self.algo = algorithm(stage_cfg, self.cfg)
        total_steps = self.algo.stage.steps
        self._start_scorer(self.algo)
        G = self.cfg.learner.groups_per_step
        self.keys = JobKeys(keys_id)
        from nebula.transport.stream import RedisTrajectoryStream

        self.stream = RedisTrajectoryStream(self.redis_url, self.keys.stream)
        self.loaded_steps = -1  # step counts restart with each stage
        pacer = self.pacer = StalenessPacer(self.redis_url, self.keys,
                                            self.cfg.async_.max_staleness, G)
        total = total_steps * G
        self.fresh_base = total  # dynamic sampling's fresh prompts come after the stage's
        inflight = self.keys.inflight(self.name)
        # Groups this worker reserved before a crash: generate them again first.
        leftover = sorted(int(t) for t in self.r.hkeys(inflight))
        if leftover:
            self.stats["regenerated"] += len(leftover)
            log.warning("%s: regenerating %d unfinished groups", self.name, len(leftover))
            self._finish(stage, leftover, *self._sample(leftover, G), G)
        # Scoring (verifier, teacher) and the stream write of one batch overlap the
        # generation of the next: at most one batch is being finished at a time, and its
        # errors surface at the next hand-off.
        from concurrent.futures import Future, ThreadPoolExecutor

        pending: Future | None = None
        from nebula.cpu_binding import bind_thread_to_host_cores

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish",
                                initializer=bind_thread_to_host_cores) as post:
            while not self.r.exists(self.keys.stop):
                want = self.cfg.rollout.prompts_per_request
                t0 = time.monotonic()
                # the script records the grant in our inflight hash, once even if retried
                tickets = pacer.reserve(want,
                                        should_stop=lambda: bool(self.r.exists(self.keys.stop)),
                                        worker=self.name, limit=total)
                t1 = time.monotonic()
                self.stats["pacing_wait_s"] += t1 - t0
                if not tickets:
                    break
                mine = [t for t in tickets if t < total]
                if mine:
                    sampled = self._sample(mine, G)
                    if pending is not None:
                        t2 = time.monotonic()
                        pending.result()
                        self.stats["finish_wait_s"] += time.monotonic() - t2
                    # Drill point: this batch generated and reserved, the one before it written.
                    maybe_crash(f"{self.name}.after_generate", armed=not self.restarted)
                    maybe_raise(f"{self.name}.raise_after_generate")
                    pending = post.submit(self._finish, stage, mine, *sampled, G)
                self.stats["busy_s"] += time.monotonic() - t1
                if len(mine) < len(tickets):  # past the stage's last ticket: nothing left
                    break
            if pending is not None:
                t1 = time.monotonic()
                pending.result()
                self.stats["busy_s"] += time.monotonic() - t1
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        return dict(self.stats)

    def _start_scorer(self, algo: Algorithm) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        if not algo.teachers():
            return
        from rollout.distill import TeacherScorer

        if not self.teacher_address:
            raise ValueError(f"stage {algo.type_name()} needs a teacher service "
                             "(cluster.teacher_address or `teachers` for the embedded one)")
        for r in self.rows:  # every prompt's domain has a teacher, before sampling
            algo.teacher_for(r.domain)
        self.scorer = TeacherScorer(self.teacher_address, algo, self.tokenizer)

    def _sample(self, tickets: list[int], G: int, rows: list[Any] | None = None
                ) -> tuple[list[Any], list[Any], int]:
        """Generate the groups of `tickets` (their prompts, or `rows`) with weights recent
        enough for the staleness bound; returns (prompt rows, samples per row, version)."""
        rc = self.cfg.rollout
        # Staleness bound: weights with >= step(t) - max_staleness steps are recent enough.
        need = max(ticket_step(t, G) for t in tickets) - self.cfg.async_.max_staleness
        rows = rows if rows is not None else [self.order[t] for t in tickets]
        with self._engine_lock:
            version = self.sync_weights(min_steps=need)
            t0 = time.monotonic()
            outs = self.episodes.run(rows, rc.samples_per_prompt, rc.temperature, rc.top_p,
                                     rc.max_tokens, rc.stop)
        self.stats["gen_s"] += time.monotonic() - t0
        return rows, outs, version

    def _score(self, stage: str, tickets: list[int], rows: list[Any], outs: list[Any],
               version: int, G: int) -> list[Any]:
        """Score the samples (verifier; teachers when the stage has them) and build the
        groups' records."""
        from rollout.groups import build_group
        from nebula.clients.verifier import Item

        t1 = time.monotonic()
        items = [Item(r.verifier, s.text, r.reference, r.metadata, id=f"{t}:{j}")
                 for t, r, group in zip(tickets, rows, outs) for j, s in enumerate(group)]
        verdicts = self.verifier.verify(items)
        t2 = time.monotonic()
        scores = None
        if self.scorer is not None:
            scores = self.scorer.score([r.prompt_ids for r in rows], [r.domain for r in rows],
                                       [[s.completion_ids for s in group] for group in outs])
            self.stats["teacher_s"] = self.stats.get("teacher_s", 0.0) + time.monotonic() - t2
        self.stats["verify_s"] += t2 - t1
        rc = self.cfg.rollout
        groups, k = [], 0
        for gi, (t, r, group) in enumerate(zip(tickets, rows, outs)):
            groups.append(build_group(
                job_id=self.job_id, stage=stage, row=r, samples=group,
                verdicts=verdicts[k:k + len(group)], version=version, ticket=t,
                step=ticket_step(t, G), worker=self.name, algo=self.algo,
                teacher=scores[gi] if scores is not None else None, truncated=rc.truncated,
                truncated_reward=rc.truncated_reward, max_tokens=rc.max_tokens,
                overlong_buffer=rc.overlong_buffer, overlong_penalty=rc.overlong_penalty))
            k += len(group)
        return groups

    def _refill(self, stage: str, groups: list[Any], G: int) -> list[Any]:
        """Dynamic sampling: a group whose rewards are all equal is generated again from a
        fresh prompt (same ticket), up to rollout.dynamic_sampling_tries times."""
        tries = self.cfg.rollout.dynamic_sampling_tries
        for attempt in range(1, tries + 1):
            redo = [k for k, g in enumerate(groups) if not informative(g)]
            if not redo:
                break
            tickets = [groups[k].ticket for k in redo]
            rows = [self.order[self.fresh_base + t * tries + attempt - 1] for t in tickets]
            new = self._score(stage, tickets, *self._sample(tickets, G, rows), G)
            for k, g in zip(redo, new):
                g.refills = attempt
                groups[k] = g
            self.stats["refills"] = self.stats.get("refills", 0) + len(redo)
        return groups

    def _finish(self, stage: str, tickets: list[int], rows: list[Any], outs: list[Any],
                version: int, G: int) -> None:
        """Score the samples, build the groups (refilling uniform ones with dynamic sampling)
        and write them to the stream, ending their reservations in the same script."""
        t1 = time.monotonic()
        groups = self._score(stage, tickets, rows, outs, version, G)
        if self.cfg.rollout.dynamic_sampling:
            groups = self._refill(stage, groups, G)
        # One script: the groups and the end of their reservations land together, and once
        # (a call that redis-py retries after a lost reply writes nothing again).
        self.pacer.publish(self.name, self.keys.stream,
                           [(g.ticket, g.SerializeToString()) for g in groups])
        self.stats["tokens"] += sum(len(s.completion_ids) for g in groups for s in g.samples)
        self.stats["groups"] += len(groups)
        self.stats["samples"] += sum(len(g.samples) for g in groups)
        self.stats["finish_s"] += time.monotonic() - t1

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(self, dataset: dict[str, Any], temperature: float, max_prompts: int,
                 samples: int = 1, top_p: float = 1.0, shard: tuple[int, int] | None = None,
                 max_tokens: int | None = None) -> dict[str, Any]:
        """Accuracy on held-out prompts with the newest weights (greedy if temperature 0, one
        sample per prompt; else `samples` per prompt), and each prompt's outcome ("details":
        row index, domain, passed / generated tokens / truncated per sample, verifier errors)
        for pass@k and the other metrics of `nebula.evaluation`. `shard` (i, w): only the
        first `max_prompts` rows' i-th of every w (an eval job splits them across workers)."""
        from nebula.config.job import DatasetConfig
        from nebula.prompts import load_prompt_rows
        from nebula.clients.verifier import OK, Item

        rows = load_prompt_rows(DatasetConfig.model_validate(dataset), self.tokenizer)
        rows = rows[:max_prompts]
        if shard is not None:
            rows = rows[shard[0]::shard[1]]
        n = 1 if temperature == 0 else samples
        rc = self.cfg.rollout
        with self._engine_lock:
            version = self.sync_weights()
            outs = self.episodes.run(rows, n, temperature, top_p, max_tokens or rc.max_tokens,
                                     rc.stop) if rows else []
        items = [Item(r.verifier, s.text, r.reference, r.metadata)
                 for r, group in zip(rows, outs) for s in group]
        verdicts = self.verifier.verify(items) if items else []
        by_domain: dict[str, list[float]] = {}
        details: list[dict[str, Any]] = []
        k = 0
        for r, group in zip(rows, outs):
            got = verdicts[k:k + len(group)]
            k += len(group)
            domain = r.domain or "all"
            by_domain.setdefault(domain, []).extend(float(v.passed) for v in got)
            mask = [getattr(s, "token_mask", None) for s in group]  # episodes: generated only
            details.append({
                "index": r.index, "domain": domain, "passed": [bool(v.passed) for v in got],
                "lengths": [sum(m) if m is not None else len(s.completion_ids)
                            for s, m in zip(group, mask)],
                "truncated": [s.finish_reason == "length" for s in group],
                "errors": sum(v.status != OK for v in got)})
        allv = [x for v in by_domain.values() for x in v]
        return {"version": version, "temperature": temperature, "samples": n,
                "prompts": len(rows), "accuracy": sum(allv) / len(allv) if allv else None,
                "by_domain": {d: sum(v) / len(v) for d, v in by_domain.items()},
                "details": details}

    def generate_raw(self, tickets: list[int]) -> dict[str, float]:
        """Benchmark hook: the bare engine on the prompts of `tickets`, in requests of the
        size the worker uses, with the job's sampling settings; no verifier, no stream."""
        rc = self.cfg.rollout
        rows = [self.order[t] for t in tickets]
        tokens, t0 = 0, time.monotonic()
        for i in range(0, len(rows), rc.prompts_per_request):
            chunk = rows[i:i + rc.prompts_per_request]
            outs = self.engine.generate([r.prompt_ids for r in chunk], rc.samples_per_prompt,
                                        rc.temperature, rc.top_p, rc.max_tokens, rc.stop)
            tokens += sum(len(s.completion_ids) for g in outs for s in g)
        return {"tokens": tokens, "seconds": time.monotonic() - t0}

    def pid(self) -> int:
        """The actor's process id (also a readiness probe: answers once __init__ is done)."""
        return os.getpid()
