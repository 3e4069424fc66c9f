"""Teacher scoring of student samples for the OPD and MOPD stages.

Each sample goes to the teacher its stage's algorithm names for the prompt's domain (opd: the
one teacher; mopd: the routing table). All sequences for one teacher go in one
TeacherLogprobs call; the
service batches them with other jobs' requests and caches repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nebula.algo import Algorithm


@dataclass
class TeacherScore:
    teacher: str
    teacher_version: str
    logprobs: list[float]
    top_ids: list[list[int]] = field(default_factory=list)  # per completion token, top_k > 0
    top_logprobs: list[list[float]] = field(default_factory=list)


class TeacherScorer:
    """Scores (prompt, completion) token ids with the routed teachers over gRPC."""

    def __init__(self, address: str, algo: Algorithm, student_tokenizer: Any) -> None:
        from nebula.clients.teacher import TeacherClient, check_compatible
        from nebula.clients.teacher import tokenizer_fingerprint

        self.algo = algo
        self.client = TeacherClient(address, timeout_s=600)
        self.client.wait_ready()
        self.fingerprint = tokenizer_fingerprint(student_tokenizer)
        for name in algo.teachers():  # unknown teacher, tokenizer mismatch: fail before sampling
            check_compatible(self.client, name, student_tokenizer)

    def score(self, prompts: Sequence[Sequence[int]], domains: Sequence[str],
              completions: Sequence[Sequence[Sequence[int]]]) -> list[list[TeacherScore]]:
        """completions[g][j]: token ids of sample j of prompt g. Returns the same shape."""
        by_teacher: dict[str, list[tuple[int, int]]] = {}
        for g, domain in enumerate(domains):
            name = self.algo.teacher_for(domain)
            by_teacher.setdefault(name, []).extend((g, j) for j in range(len(completions[g])))
        out: list[list[TeacherScore | None]] = [[None] * len(c) for c in completions]
        for name, where in by_teacher.items():
            seqs = [(prompts[g], completions[g][j]) for g, j in where]
            res = self.client.logprobs(name, seqs, top_k=self.algo.teacher_top_k,
                                       tokenizer_fingerprint=self.fingerprint)
            for (g, j), r in zip(where, res.results):
                out[g][j] = TeacherScore(res.teacher, res.teacher_version, list(r.logprobs),
                                         r.top_ids, r.top_logprobs)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.client.close()
