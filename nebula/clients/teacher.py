"""Python client of the teacher service, the tokenizer compatibility check used at job
registration, and `teacher_process` to run the service as a child process (tests, embedded use).

Light: imports grpc and the generated stubs only (transformers only when `check_compatible` is
given a tokenizer path)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from nebula.service_process import free_port, service_process
from nebula.supervisor import DEFAULT_RETRY_S, RECONNECT_OPTIONS, call_retrying
from nebula.v1 import teacher_pb2 as pb
from nebula.v1 import teacher_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_MB = 1 << 20
SequenceLike = pb.TokenSequence | tuple[Sequence[int], Sequence[int]] | dict[str, Sequence[int]]


class TokenizerMismatchError(ValueError):
    """The student's tokenizer is not the teacher's."""


class UnknownTeacherError(LookupError):
    """The service does not host the named teacher."""


@dataclass
class SequenceScores:
    """Teacher scores of one sequence's completion tokens."""

    logprobs: list[float]
    top_ids: list[list[int]] = field(default_factory=list)  # per completion token, when top_k > 0
    top_logprobs: list[list[float]] = field(default_factory=list)
    cache_hit: bool = False


@dataclass
class TeacherScores:
    """Answer of one TeacherLogprobs call: per-sequence scores plus the teacher's version."""

    teacher: str
    teacher_version: str
    results: list[SequenceScores]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[SequenceScores]:
        return iter(self.results)

    def __getitem__(self, i: int) -> SequenceScores:
        return self.results[i]


def channel_options(max_message_mb: int = 64) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_mb * _MB),
            ("grpc.max_receive_message_length", max_message_mb * _MB), *RECONNECT_OPTIONS]


def sequence_to_pb(s: SequenceLike) -> pb.TokenSequence:
    if isinstance(s, pb.TokenSequence):
        return s
    if isinstance(s, dict):
        return pb.TokenSequence(prompt_ids=list(s["prompt_ids"]),
                                completion_ids=list(s["completion_ids"]))
    prompt, completion = s
    return pb.TokenSequence(prompt_ids=list(prompt), completion_ids=list(completion))


def scores_from_pb(r: pb.SequenceLogprobs) -> SequenceScores:
    return SequenceScores(logprobs=list(r.logprobs),
                          top_ids=[list(t.token_ids) for t in r.top],
                          top_logprobs=[list(t.logprobs) for t in r.top],
                          cache_hit=r.cache_hit)


class TeacherClient:
    """Blocking client; one channel, safe to share between threads.

    Every call has a deadline (`timeout_s`). A call that finds the service UNAVAILABLE (down,
    being restarted by its supervisor, connection reset mid-call) is sent again with the same
    sequences for up to `retry_s` of outage, one log line per outage; teacher log-probs are a
    pure function of the request, so the retried call answers what the first would have.
    `stats` counts outages and retries."""

    def __init__(self, address: str, timeout_s: float = 120.0, max_message_mb: int = 64,
                 retry_s: float = DEFAULT_RETRY_S) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.stats: dict[str, int] = {"outages": 0, "retries": 0}
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_mb))
        self._stub = pb_grpc.TeacherServiceStub(self._channel)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        log.info("waiting up to %.0f s for the teacher service at %s", timeout_s, self.address)
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def _call(self, method: Any, request: Any) -> Any:
        return call_retrying(method, request, timeout_s=self.timeout_s, retry_s=self.retry_s,
                             what=f"teacher service at {self.address}", stats=self.stats)

    def logprobs_pb(self, request: pb.TeacherLogprobsRequest) -> pb.TeacherLogprobsResponse:
        return self._call(self._stub.TeacherLogprobs, request)

    def logprobs(self, teacher: str, sequences: Sequence[SequenceLike], top_k: int = 0,
                 tokenizer_fingerprint: str = "") -> TeacherScores:
        """Teacher log-prob of every completion token of each (prompt_ids, completion_ids).
        Raises grpc.RpcError: NOT_FOUND (unknown teacher), FAILED_PRECONDITION (tokenizer
        fingerprint mismatch), INVALID_ARGUMENT (bad ids / lengths / top_k)."""
        req = pb.TeacherLogprobsRequest(teacher=teacher,
                                        sequences=[sequence_to_pb(s) for s in sequences],
                                        top_k=top_k, tokenizer_fingerprint=tokenizer_fingerprint)
        resp = self.logprobs_pb(req)
        return TeacherScores(resp.teacher, resp.teacher_version,
                             [scores_from_pb(r) for r in resp.results])

    def list_teachers(self) -> list[dict[str, Any]]:
        resp = self._call(self._stub.ListTeachers, pb.ListTeachersRequest())
        return [{"name": t.name, "version": t.version, "vocab_size": t.vocab_size,
                 "tokenizer_fingerprint": t.tokenizer_fingerprint} for t in resp.teachers]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FINGERPRINT_SPECIALS = ("bos", "eos", "unk")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable hash of a tokenizer's vocabulary (token -> id, added tokens included) and its
    bos/eos/unk ids. Two tokenizers with equal fingerprints map every token to the same id."""
    vocab = tokenizer.get_vocab()
    items = sorted(((int(i), str(t)) for t, i in vocab.items()))
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in FINGERPRINT_SPECIALS}
    h = hashlib.sha256()
    h.update(json.dumps({"vocab": items, "special": special}, ensure_ascii=False,
                        separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def check_compatible(client: TeacherClient, teacher: str, student_tokenizer: Any) -> dict[str, Any]:
    """Check that `teacher` is hosted and shares the student's tokenizer; returns its info.

    `student_tokenizer` is a transformers tokenizer or a checkpoint/tokenizer path. Raises
    UnknownTeacherError or TokenizerMismatchError with a message fit for a job registration error.
    """
    if isinstance(student_tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        student_tokenizer = AutoTokenizer.from_pretrained(student_tokenizer)
    teachers = {t["name"]: t for t in client.list_teachers()}
    info = teachers.get(teacher)
    if info is None:
        hosted = ", ".join(sorted(teachers)) or "none"
        raise UnknownTeacherError(f"teacher {teacher!r} is not hosted by the teacher service at "
                                  f"{client.address}; hosted teachers: {hosted}")
    fp = tokenizer_fingerprint(student_tokenizer)
    if fp != info["tokenizer_fingerprint"]:
        raise TokenizerMismatchError(
            f"student and teacher tokenizers differ: teacher {teacher!r} (version "
            f"{info['version']}, vocab size {info['vocab_size']}) has tokenizer fingerprint "
            f"{info['tokenizer_fingerprint']}, the student's tokenizer ({len(student_tokenizer)} "
            f"tokens) has {fp}. On-policy distillation scores the student's token ids with the "
            f"teacher, so both must use the same vocabulary and special tokens.")
    return info


# -- child process -----------------------------------------------------------------------------


@contextmanager
def teacher_process(work_dir: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                    timeout_s: float = 120.0, supervise: bool | dict[str, Any] = False
                    ) -> Iterator[dict[str, Any]]:
    """A `python -m teacher` child on loopback (stopped by its PID on exit); yields address,
    metrics port, log path, the process and its supervisor. `config` is a
    TeacherServiceConfig as a dict. `supervise` (True or Supervisor options): restarted on
    the same ports when it dies (`nebula.service_process.service_process`)."""
    cfg = {"metrics_port": free_port(), **config}
    with service_process("teacher", work_dir, cfg, env, timeout_s, supervise=supervise) as srv:
        yield srv
