"""Dynamic batching of teacher forward passes across concurrent requests.

Each teacher has a queue and a loop task. The loop takes the first waiting sequence, keeps
collecting for `batch_wait_ms` (or until `max_batch_sequences`), and scores the lot in one call to
`HostedTeacher.score` on the teacher's own thread, so the asyncio loop keeps serving. Sequences that
arrive while a batch is computing wait in the queue and form the next batch (continuous batching).
Cache hits are answered at once and never queued; identical sequences in one batch are computed
once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from teacher import metrics
from teacher.cache import CacheKey, LRUCache, cache_key
from teacher.model import HostedTeacher, SeqScore

log = logging.getLogger("nebula.teacher")


@dataclass
class BatchStats:
    batches: int = 0  # batching windows run
    merged_batches: int = 0  # windows holding sequences of two or more requests
    forward_sequences: int = 0  # distinct sequences computed
    forward_tokens: int = 0  # completion tokens computed
    max_batch_requests: int = 0
    max_batch_sequences: int = 0
    compute_s: float = 0.0


@dataclass
class _Pending:
    key: CacheKey
    prompt: np.ndarray
    completion: np.ndarray
    top_k: int
    request: int
    future: asyncio.Future = field(repr=False)


class TeacherBatcher:
    """Batches the sequences of concurrent requests for one teacher."""

    def __init__(self, teacher: HostedTeacher, cache: LRUCache[SeqScore], batch_wait_s: float,
                 max_batch_sequences: int) -> None:
        self.teacher = teacher
        self.cache = cache
        self.batch_wait_s = batch_wait_s
        self.max_batch_sequences = max_batch_sequences
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"teacher-{teacher.name}")
        self._request_ids = itertools.count()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"batcher-{self.teacher.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def score(self, seqs: Sequence[tuple[np.ndarray, np.ndarray]],
                    top_k: int) -> list[tuple[SeqScore, bool]]:
        """(scores, cache_hit) per sequence, in order. Sequences must be valid for the teacher."""
        assert self._queue is not None, "start() the batcher first"
        t = self.teacher
        name = t.name
        loop = asyncio.get_running_loop()
        request = next(self._request_ids)
        out: list[tuple[SeqScore, bool] | None] = [None] * len(seqs)
        waiting: list[tuple[int, asyncio.Future]] = []
        hits = 0
        for i, (p, c) in enumerate(seqs):
            key = cache_key(name, t.version, p, c, top_k)
            hit = self.cache.get(key) if self.cache.enabled else None
            if hit is not None:
                out[i] = (hit, True)
                hits += 1
                continue
            fut = loop.create_future()
            self._queue.put_nowait(_Pending(key, p, c, top_k, request, fut))
            waiting.append((i, fut))
        if self.cache.enabled:
            metrics.CACHE.labels(name, "hit").inc(hits)
            metrics.CACHE.labels(name, "miss").inc(len(waiting))
        if hits:
            metrics.SEQUENCES.labels(name, "cache").inc(hits)
            metrics.TOKENS.labels(name, "cache").inc(
                sum(len(seqs[i][1]) for i, r in enumerate(out) if r is not None))
        if waiting:
            scores = await asyncio.gather(*(f for _, f in waiting))
            for (i, _), s in zip(waiting, scores):
                out[i] = (s, False)
        return out  # type: ignore[return-value]

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Pending | None = None
        while True:
            batch = [carry if carry is not None else await self._queue.get()]
            carry = None
            deadline = loop.time() + self.batch_wait_s
            while len(batch) < self.max_batch_sequences:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            # Never split a request across batches: its sequences are queued together, and
            # splitting them costs padding (each batch is length-sorted on its own) and a
            # second forward wait. Also take what is already queued, up to a bound; score()
            # cuts the batch into sorted passes of at most max_batch_sequences anyway.
            bound = 4 * self.max_batch_sequences
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if len(batch) >= bound and nxt.request != batch[-1].request:
                    carry = nxt  # first item of the next batch
                    break
                batch.append(nxt)
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - surfaced to every waiting request
                log.exception("teacher %s: batch of %d sequences failed", self.teacher.name,
                              len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)

    async def _process(self, batch: list[_Pending]) -> None:
        name = self.teacher.name
        batch = [p for p in batch if not p.future.done()]  # drop those whose caller gave up
        if not batch:
            return
        groups: dict[CacheKey, list[_Pending]] = {}
        for p in batch:
            groups.setdefault(p.key, []).append(p)
        todo: list[list[_Pending]] = []
        for key, ps in groups.items():
            cached = self.cache.peek(key) if self.cache.enabled else None
            if cached is not None:  # computed by the previous batch while this one waited
                for p in ps:
                    if not p.future.done():
                        p.future.set_result(cached)
            else:
                todo.append(ps)
        requests = len({p.request for p in batch})
        st = self.stats
        st.batches += 1
        st.max_batch_requests = max(st.max_batch_requests, requests)
        st.max_batch_sequences = max(st.max_batch_sequences, len(batch))
        metrics.BATCHES.labels(name).inc()
        metrics.BATCH_REQUESTS.labels(name).observe(requests)
        metrics.BATCH_SEQUENCES.labels(name).observe(len(batch))
        if requests > 1:
            st.merged_batches += 1
            metrics.MERGED_BATCHES.labels(name).inc()
        if not todo:
            return
        seqs = [(ps[0].prompt, ps[0].completion) for ps in todo]
        ks = [ps[0].top_k for ps in todo]
        t0 = time.monotonic()
        scores, passes = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._score_blocking, seqs, ks)
        dt = time.monotonic() - t0
        tokens = sum(len(c) for _, c in seqs)
        st.forward_sequences += len(seqs)
        st.forward_tokens += tokens
        st.compute_s += dt
        metrics.FORWARDS.labels(name).inc(passes)
        metrics.BATCH_SECONDS.labels(name).observe(dt)
        metrics.SEQUENCES.labels(name, "forward").inc(len(seqs))
        metrics.TOKENS.labels(name, "forward").inc(tokens)
        for ps, s in zip(todo, scores):
            self.cache.put(ps[0].key, s)
            for p in ps:
                if not p.future.done():
                    p.future.set_result(s)

    def _score_blocking(self, seqs: list[tuple[np.ndarray, np.ndarray]],
                        ks: list[int]) -> tuple[list[SeqScore], int]:
        t = self.teacher
        before = t.forward_passes
        scores = t.score(seqs, ks, self.max_batch_sequences)
        return scores, t.forward_passes - before
