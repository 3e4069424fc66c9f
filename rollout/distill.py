"""Teacher scoring of student samples for the OPD and MOPD stages.

Each sample goes to a teacher: the stage's one teacher (opd) or its domain's teacher by the
routing table (mopd). All sequences for one teacher go in one TeacherLogprobs call; the
service batches them with other jobs' requests and caches repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nebula.config.job import MOPDStage, OPDStage


class UnroutedDomainError(ValueError):
    """A prompt's domain has no teacher in the MOPD routing table."""


@dataclass
class TeacherScore:
    teacher: str
    teacher_version: str
    logprobs: list[float]
    top_ids: list[list[int]] = field(default_factory=list)  # per completion token, top_k > 0
    top_logprobs: list[list[float]] = field(default_factory=list)


def route(stage: OPDStage | MOPDStage, domain: str) -> str:
    """The teacher that scores a prompt of `domain` in `stage`."""
    if isinstance(stage, OPDStage):
        return stage.teacher
    try:
        return stage.routing[domain]
    except KeyError:
        raise UnroutedDomainError(
            f"mopd routing has no teacher for domain {domain!r} (routed: "
            f"{', '.join(sorted(stage.routing))})") from None


def check_routing(stage: OPDStage | MOPDStage, domains: Sequence[str]) -> None:
    """Raise UnroutedDomainError naming every domain the stage cannot route."""
    if isinstance(stage, OPDStage):
        return
    missing = sorted(set(domains) - stage.routing.keys())
    if missing:
        raise UnroutedDomainError(
            f"mopd routing has no teacher for domain(s) {', '.join(map(repr, missing))} of the "
            f"training prompts (routed: {', '.join(sorted(stage.routing))})")


class TeacherScorer:
    """Scores (prompt, completion) token ids with the routed teachers over gRPC."""

    def __init__(self, address: str, stage: OPDStage | MOPDStage, student_tokenizer: Any) -> None:
        from teacher.client import TeacherClient, check_compatible
        from teacher.model import tokenizer_fingerprint

        self.stage = stage
        self.client = TeacherClient(address, timeout_s=600)
        self.client.wait_ready()
        self.fingerprint = tokenizer_fingerprint(student_tokenizer)
        teachers = [stage.teacher] if isinstance(stage, OPDStage) else sorted(
            set(stage.routing.values()))
        for name in teachers:  # unknown teacher or tokenizer mismatch: fail before sampling
            check_compatible(self.client, name, student_tokenizer)

    def score(self, prompts: Sequence[Sequence[int]], domains: Sequence[str],
              completions: Sequence[Sequence[Sequence[int]]]) -> list[list[TeacherScore]]:
        """completions[g][j]: token ids of sample j of prompt g. Returns the same shape."""
        by_teacher: dict[str, list[tuple[int, int]]] = {}
        for g, domain in enumerate(domains):
            name = route(self.stage, domain)
            by_teacher.setdefault(name, []).extend((g, j) for j in range(len(completions[g])))
        out: list[list[TeacherScore | None]] = [[None] * len(c) for c in completions]
        for name, where in by_teacher.items():
            seqs = [(prompts[g], completions[g][j]) for g, j in where]
            res = self.client.logprobs(name, seqs, top_k=self.stage.top_k,
                                       tokenizer_fingerprint=self.fingerprint)
            for (g, j), r in zip(where, res.results):
                out[g][j] = TeacherScore(res.teacher, res.teacher_version, list(r.logprobs),
                                         r.top_ids, r.top_logprobs)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.client.close()
