"""What one RL step's groups say about the rollouts: rewards, the verifier's and the
environment's failures, staleness, lengths and truncation (logged beside the loss)."""

from __future__ import annotations

from typing import Any


def group_metrics(groups: list[Any], stale: list[int], uniform: int) -> dict[str, float]:
    """`stale`: each group's staleness (learner version - its oldest token's version);
    `uniform`: groups whose rewards were all equal (no advantage)."""
    samples = [s for g in groups for s in g.samples]
    n = len(samples)
    tokens = sum(len(s.completion_ids) for s in samples)
    m: dict[str, float] = {}
    if any(s.turns > 1 or s.tool_calls for s in samples):
        m["turns_mean"] = sum(s.turns for s in samples) / n
        m["tool_calls_mean"] = sum(s.tool_calls for s in samples) / n
    m.update({
        "reward_mean": sum(s.reward for s in samples) / n,
        "pass_rate": sum(s.verify.passed for s in samples) / n,
        # samples the verifier could not score: out of the loss (rollout/groups.py)
        "verifier_errors": sum(s.verify.status == 2 for s in samples),
        "verifier_timeouts": sum(s.verify.status == 3 for s in samples),
        # episodes the environment failed (an unreadable tool call): out of the loss
        "env_errors": sum(bool(s.env_error) for s in samples),
        # dynamic sampling: groups generated again from a fresh prompt
        "refills": sum(g.refills for g in groups),
        "uniform_groups": uniform,
        "staleness_max": max(stale), "staleness_mean": sum(stale) / len(stale),
        "completion_len_mean": tokens / n,
        "truncation_rate": sum(s.truncated for s in samples) / n,
        "tokens": tokens,
    })
    return m
