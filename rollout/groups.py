"""Turn generated samples and their verdicts into TrajectoryGroup records."""

from __future__ import annotations

import time

from nebula.v1 import verifier_pb2
from nebula.v1.trajectory_pb2 import TrajectoryGroup
from rollout.prompts import PromptRow


def group_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """GRPO: (r - mean) / (std + eps) within the group; all zero when rewards are equal."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / n) ** 0.5
    if std < eps:
        return [0.0] * n
    return [(r - mean) / (std + eps) for r in rewards]


def build_group(*, job_id: str, stage: str, row: PromptRow, samples: list, verdicts: list,
                version: int, ticket: int, step: int, worker: str) -> TrajectoryGroup:
    """samples: engine SampleOut list; verdicts: verifier ItemResult list (same order)."""
    rewards = [v.reward if v.status == "ok" else 0.0 for v in verdicts]
    advantages = group_advantages(rewards)
    g = TrajectoryGroup(
        group_id=f"{job_id}:{ticket}", job_id=job_id, stage=stage, prompt_id=row.prompt_id,
        domain=row.domain, prompt_ids=row.prompt_ids, prompt_text=row.prompt_text,
        reference=row.reference, min_policy_version=version, max_policy_version=version,
        rollout_worker=worker, created_unix=time.time(), ticket=ticket, step=step,
    )
    for s, v, r, a in zip(samples, verdicts, rewards, advantages):
        n = len(s.completion_ids)
        sample = g.samples.add(
            completion_ids=s.completion_ids, behaviour_logprobs=s.logprobs,
            policy_versions=[version] * n, loss_mask=[1] * n, reward=r, advantage=a,
            completion_text=s.text, finish_reason=s.finish_reason,
        )
        sample.verify.CopyFrom(verifier_pb2.VerifyResult(
            id=v.id, verifier=v.verifier, reward=v.reward, passed=v.passed, reason=v.reason,
            verifier_version=v.verifier_version, elapsed_s=v.elapsed_s,
            status={"ok": 1, "error": 2, "timeout": 3}[v.status]))
    return g
