"""gRPC server of the teacher service: TeacherLogprobs / ListTeachers over dynamically batched
teacher forward passes, plus the standard health service, server reflection and Prometheus
metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence

import grpc
import numpy as np

from nebula.config.teacher import TeacherServiceConfig
from nebula.grpc_host import GrpcHost
from nebula.v1 import teacher_pb2 as pb
from nebula.v1 import teacher_pb2_grpc as pb_grpc
from teacher import metrics
from teacher.batcher import TeacherBatcher
from teacher.cache import LRUCache
from teacher.model import HostedTeacher, SeqScore

log = logging.getLogger("nebula.teacher")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name


class RequestError(Exception):
    """A request the service refuses; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def load_teachers(config: TeacherServiceConfig) -> dict[str, HostedTeacher]:
    """Load every configured teacher (TeacherLoadError names the field of a bad one)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = {}
    for i, tc in enumerate(config.teachers):
        t0 = time.monotonic()
        t = HostedTeacher(tc, field=f"teachers.{i}")
        out[tc.name] = t
        log.info("teacher %s loaded from %s on %s (%s, version %s, vocab %d, fingerprint %s) "
                 "in %.1fs", t.name, tc.path, t.device, tc.dtype, t.version, t.vocab_size,
                 t.fingerprint, time.monotonic() - t0)
    return out


def score_to_pb(score: SeqScore, cache_hit: bool) -> pb.SequenceLogprobs:
    msg = pb.SequenceLogprobs(logprobs=score.logprobs.tolist(), cache_hit=cache_hit)
    if score.top_ids is not None:
        msg.top.extend(pb.TopLogprobs(token_ids=i, logprobs=v)
                       for i, v in zip(score.top_ids.tolist(), score.top_logprobs.tolist()))
    return msg


class TeacherEngine:
    """The hosted teachers, their batchers and the shared cache (no gRPC in here)."""

    def __init__(self, config: TeacherServiceConfig,
                 teachers: dict[str, HostedTeacher] | None = None) -> None:
        self.config = config
        self.teachers = teachers if teachers is not None else load_teachers(config)
        self.cache: LRUCache[SeqScore] = LRUCache(config.cache_entries)
        self.batchers = {n: TeacherBatcher(t, self.cache, config.batch_wait_ms / 1000.0,
                                           config.max_batch_sequences)
                         for n, t in self.teachers.items()}

    def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()

    def info(self) -> list[dict]:
        return [t.info() for t in self.teachers.values()]

    def get(self, name: str) -> HostedTeacher:
        t = self.teachers.get(name)
        if t is None:
            hosted = ", ".join(sorted(self.teachers)) or "none"
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown teacher {name!r}; hosted teachers: {hosted}")
        return t

    def validate(self, teacher: HostedTeacher, sequences: Sequence[pb.TokenSequence], top_k: int,
                 fingerprint: str) -> list[tuple[np.ndarray, np.ndarray]]:
        if fingerprint and fingerprint != teacher.fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"student and teacher tokenizers differ: the request's tokenizer fingerprint "
                f"{fingerprint} is not teacher {teacher.name!r}'s {teacher.fingerprint} (token ids "
                f"would mean different tokens; distill only between models sharing a vocabulary)")
        limit = min(self.config.max_top_k, teacher.vocab_size)
        if not 0 <= top_k <= limit:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"top_k {top_k} is outside [0, {limit}] (max_top_k "
                               f"{self.config.max_top_k}, vocab {teacher.vocab_size})")
        seqs = []
        for i, s in enumerate(sequences):
            p = np.array(s.prompt_ids, dtype=np.int64)
            c = np.array(s.completion_ids, dtype=np.int64)
            why = teacher.check_sequence(p, c)
            if why is not None:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"sequences[{i}]: {why}")
            p.flags.writeable = False
            c.flags.writeable = False
            seqs.append((p, c))
        return seqs

    async def logprobs(self, request: pb.TeacherLogprobsRequest) -> pb.TeacherLogprobsResponse:
        teacher = self.get(request.teacher)
        seqs = self.validate(teacher, request.sequences, request.top_k,
                             request.tokenizer_fingerprint)
        scored = await self.batchers[teacher.name].score(seqs, request.top_k)
        return pb.TeacherLogprobsResponse(
            results=[score_to_pb(s, hit) for s, hit in scored],
            teacher=teacher.name, teacher_version=teacher.version)


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, engine: TeacherEngine) -> None:
        self.engine = engine

    async def TeacherLogprobs(self, request: pb.TeacherLogprobsRequest,
                              context: grpc.aio.ServicerContext) -> pb.TeacherLogprobsResponse:
        t0 = time.monotonic()
        label = request.teacher if request.teacher in self.engine.teachers else "<unknown>"
        try:
            resp = await self.engine.logprobs(request)
        except RequestError as e:
            metrics.REQUESTS.labels(label, e.code.name).inc()
            await context.abort(e.code, str(e))
        except Exception as e:  # noqa: BLE001 - a failed forward (OOM, ...) is the server's fault
            log.exception("TeacherLogprobs failed")
            metrics.REQUESTS.labels(label, "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"teacher forward failed: {e}")
        metrics.REQUESTS.labels(label, "OK").inc()
        metrics.REQUEST_LATENCY.observe(time.monotonic() - t0)
        return resp

    async def ListTeachers(self, request: pb.ListTeachersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListTeachersResponse:
        return pb.ListTeachersResponse(teachers=[pb.TeacherInfo(**t) for t in self.engine.info()])


class TeacherServer:
    """Owns the teachers (loaded in `start`) and the grpc.aio server."""

    def __init__(self, config: TeacherServiceConfig) -> None:
        self.config = config
        self.engine: TeacherEngine | None = None
        self.host = GrpcHost(config.host, config.port, config.max_message_mb, SERVICE_NAME,
                             config.metrics_port)

    @property
    def port(self) -> int | None:
        return self.host.port

    async def start(self) -> int:
        teachers = await asyncio.to_thread(load_teachers, self.config)
        self.engine = TeacherEngine(self.config, teachers)
        self.engine.start()
        servicer = TeacherServicer(self.engine)
        return await self.host.start(
            lambda srv: pb_grpc.add_TeacherServiceServicer_to_server(servicer, srv))

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.host.stop(grace_s)
        if self.engine is not None:
            await self.engine.close()

    async def wait(self) -> None:
        await self.host.wait()


async def serve(config: TeacherServiceConfig) -> None:
    """Run until SIGINT/SIGTERM, then drain in-flight calls."""
    server = TeacherServer(config)
    port = await server.start()
    assert server.engine is not None
    names = ", ".join(f"{t.name}@{t.version}" for t in server.engine.teachers.values())
    msg = f"teacher service listening on {config.host}:{port} (teachers: {names})"
    if config.metrics_port is not None:
        msg += f"; metrics on :{config.metrics_port}/metrics"
    print(msg, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
