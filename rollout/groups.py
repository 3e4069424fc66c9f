"""Turn generated samples and their verdicts into TrajectoryGroup records."""

from __future__ import annotations

import time
from collections.abc import Sequence

from learner.losses.grpo import group_advantages
from learner.losses.opd import group_baseline, opd_token_advantages
from nebula.v1 import verifier_pb2
from nebula.v1.trajectory_pb2 import TrajectoryGroup
from rollout.distill import TeacherScore
from nebula.prompts import PromptRow

__all__ = ["build_group", "group_advantages"]


def build_group(*, job_id: str, stage: str, row: PromptRow, samples: list, verdicts: list,
                version: int, ticket: int, step: int, worker: str,
                teacher: Sequence[TeacherScore] | None = None, alpha: float = 0.0,
                baseline: str = "none", top_k: int = 0, truncated: str = "keep",
                truncated_reward: float = 0.0) -> TrajectoryGroup:
    """samples: engine SampleOut list; verdicts: verifier ItemResult list (same order).

    With `teacher` scores (OPD/MOPD), every sample gets per-token advantages
    log pi_teacher - log pi_behaviour (minus the group's mean of it with baseline "group")
    + alpha * outcome advantage, and records which teacher and teacher version scored it.
    With `top_k` > 0 the learner matches the teacher's top-k distribution instead: the sample
    keeps the teacher's top-k per token and its per-token advantage is alpha * outcome
    advantage only.

    A completion cut by max_tokens is marked `truncated`; `truncated` (the job's
    rollout.truncated) says what that means: keep (trained as any other), mask (loss mask 0,
    so it adds no gradient, but its reward still counts in the group's statistics, as in
    DAPO's overlong filtering) or penalty (its reward becomes `truncated_reward`).

    A sample the verifier could not score (status error or timeout) is left out of the loss
    and of its group's advantage statistics (GRPO, or OPD with alpha > 0).
    """
    if truncated not in ("keep", "mask", "penalty"):
        raise ValueError(f"rollout.truncated must be keep, mask or penalty, not {truncated!r}")
    cut = [s.finish_reason == "length" for s in samples]
    # A verdict of error/timeout is no verdict: its sample is not a wrong answer. It stays out
    # of the group's statistics and out of the loss, unless the outcome plays no part in
    # training (pure distillation: the teacher's signal does not depend on the verifier).
    unscored = [v.status != "ok" and (teacher is None or alpha > 0) for v in verdicts]
    rewards = [v.reward if v.status == "ok" else 0.0 for v in verdicts]
    if truncated == "penalty":
        rewards = [truncated_reward if c else r for c, r in zip(cut, rewards)]
    scored = iter(group_advantages([r for r, u in zip(rewards, unscored) if not u]))
    advantages = [0.0 if u else next(scored) for u in unscored]
    g = TrajectoryGroup(
        group_id=f"{job_id}:{ticket}", job_id=job_id, stage=stage, prompt_id=row.prompt_id,
        domain=row.domain, prompt_ids=row.prompt_ids, prompt_text=row.prompt_text,
        reference=row.reference, min_policy_version=version, max_policy_version=version,
        rollout_worker=worker, created_unix=time.time(), ticket=ticket, step=step,
    )
    b = 0.0
    if teacher is not None and baseline == "group" and top_k == 0:
        b = group_baseline([[t - s for s, t in zip(smp.logprobs, sc.logprobs)]
                            for smp, sc in zip(samples, teacher)])
    for i, (s, v, r, a) in enumerate(zip(samples, verdicts, rewards, advantages)):
        n = len(s.completion_ids)
        sample = g.samples.add(
            completion_ids=s.completion_ids, behaviour_logprobs=s.logprobs,
            policy_versions=[version] * n,
            loss_mask=[0 if unscored[i] or (cut[i] and truncated == "mask") else 1] * n,
            reward=r, advantage=a,
            completion_text=s.text, finish_reason=s.finish_reason, truncated=cut[i],
        )
        if teacher is not None:
            t = teacher[i]
            sample.teacher_logprobs.extend(t.logprobs)
            if top_k > 0:
                if len(t.top_ids) != n or any(len(ids) != top_k for ids in t.top_ids):
                    raise ValueError(f"teacher {t.teacher} returned top-k rows of the wrong "
                                     f"shape for {n} tokens at top_k={top_k}")
                sample.teacher_top_k = top_k
                sample.teacher_top_ids.extend(i for ids in t.top_ids for i in ids)
                sample.teacher_top_logprobs.extend(x for row in t.top_logprobs for x in row)
                sample.token_advantages.extend([alpha * a] * n)
            else:
                sample.token_advantages.extend(opd_token_advantages(s.logprobs, t.logprobs, a,
                                                                    alpha, b))
            sample.teacher, sample.teacher_version = t.teacher, t.teacher_version
        sample.verify.CopyFrom(verifier_pb2.VerifyResult(
            id=v.id, verifier=v.verifier, reward=v.reward, passed=v.passed, reason=v.reason,
            verifier_version=v.verifier_version, elapsed_s=v.elapsed_s,
            status={"ok": 1, "error": 2, "timeout": 3}[v.status]))
    return g
