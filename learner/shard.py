"""How one optimizer step's work is split across the learner's data-parallel ranks.

Every rank gets a share of the step's groups (online) or examples (offline), balanced by
tokens: longest first, each onto the rank with the fewest tokens so far (LPT scheduling),
ties to the lowest rank, so every rank computes the same split from the same list. The
losses are normalised by the whole step's counts (`DSLearnerEngine.step` sums them over the
ranks), so the split changes nothing but who computes what."""

from __future__ import annotations

from typing import Any, Sequence


def split_balanced(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` per part (each part's in ascending order)."""
    load = [0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        p = min(range(parts), key=lambda p: (load[p], p))
        out[p].append(i)
        load[p] += sizes[i]
    return [sorted(o) for o in out]


def group_tokens(group: Any) -> int:
    """Tokens a trajectory group costs the learner (prompt + completion of each sample)."""
    return sum(len(group.prompt_ids) + len(s.completion_ids) for s in group.samples)


def example_tokens(example: Any) -> int:
    """Tokens an offline example (`nebula.algo.Example`) costs the learner."""
    return sum(len(p) + len(c) for p, c in example.sequences)
