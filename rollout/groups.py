"""Turn generated samples and their verdicts into TrajectoryGroup records."""

from __future__ import annotations

import time
from collections.abc import Sequence

from nebula.algo import Algorithm
from nebula.env.base import OBSERVATION_VERSION
from nebula.prompts import PromptRow
from nebula.v1 import verifier_pb2
from nebula.v1.trajectory_pb2 import TrajectoryGroup
from rollout.distill import TeacherScore

__all__ = ["build_group"]


def build_group(*, job_id: str, stage: str, row: PromptRow, samples: list, verdicts: list,
                version: int, ticket: int, step: int, worker: str, algo: Algorithm,
                teacher: Sequence[TeacherScore] | None = None, truncated: str = "keep",
                truncated_reward: float = 0.0, max_tokens: int = 0, overlong_buffer: int = 0,
                overlong_penalty: float = 1.0) -> TrajectoryGroup:
    """samples: engine SampleOut list; verdicts: verifier ItemResult list (same order);
    teacher: each sample's teacher score when the stage has teachers (opd/mopd).

    The advantages come from the stage's algorithm (`Algorithm.advantages`: GRPO's group
    normalised outcome, OPD's per-token teacher log-ratio, ...). Teacher scores are recorded
    with the samples (log-probs, which teacher and version, and the top-k rows when the
    algorithm asks for them).

    A completion cut by max_tokens is marked `truncated`; `truncated` (the job's
    rollout.truncated) says what that means: keep (trained as any other), mask (loss mask 0,
    so it adds no gradient, but its reward still counts in the group's statistics, as in
    DAPO's overlong filtering) or penalty (its reward becomes `truncated_reward`). With
    `overlong_buffer` > 0, a completion of more than max_tokens - overlong_buffer generated
    tokens loses up to `overlong_penalty` of reward, linearly (DAPO's soft punishment).

    A sample the verifier could not score (status error or timeout) is left out of the loss
    and of its group's advantage statistics, unless the algorithm does not use the verdicts
    (pure distillation: the teacher's signal does not depend on the verifier).
    """
    if truncated not in ("keep", "mask", "penalty"):
        raise ValueError(f"rollout.truncated must be keep, mask or penalty, not {truncated!r}")
    cut = [s.finish_reason == "length" for s in samples]
    # 1 on the policy's tokens; multi-turn episodes (rollout/episodes.py) mark observation
    # tokens 0: they are the environment's.
    own = [getattr(s, "token_mask", None) or [1] * len(s.completion_ids) for s in samples]
    # A verdict of error/timeout is no verdict: its sample is not a wrong answer. An episode
    # the environment failed (an unreadable tool call) is never trained as if valid either.
    failed = [bool(getattr(s, "error", "")) for s in samples]
    unscored = [(v.status != "ok" and algo.uses_verdicts) or f for v, f in zip(verdicts, failed)]
    rewards = [(v.reward if v.status == "ok" else 0.0)
               + sum(getattr(s, "reward_parts", {}).values()) for v, s in zip(verdicts, samples)]
    if truncated == "penalty":
        rewards = [truncated_reward if c else r for c, r in zip(cut, rewards)]
    if overlong_buffer > 0:  # DAPO's soft over-long punishment on the generated tokens
        excess = [max(0, sum(m) - (max_tokens - overlong_buffer)) for m in own]
        rewards = [r - overlong_penalty * min(1.0, e / overlong_buffer)
                   for r, e in zip(rewards, excess)]
    advantages = algo.advantages(rewards, [not u for u in unscored], samples, teacher)
    g = TrajectoryGroup(
        group_id=f"{job_id}:{ticket}", job_id=job_id, stage=stage, prompt_id=row.prompt_id,
        domain=row.domain, prompt_ids=row.prompt_ids, prompt_text=row.prompt_text,
        reference=row.reference, min_policy_version=version, max_policy_version=version,
        rollout_worker=worker, created_unix=time.time(), ticket=ticket, step=step,
    )
    top_k = algo.teacher_top_k
    for i, (s, v, r, (a, token_adv)) in enumerate(zip(samples, verdicts, rewards, advantages)):
        n = len(s.completion_ids)
        drop = unscored[i] or (cut[i] and truncated == "mask")
        sample = g.samples.add(
            completion_ids=s.completion_ids, behaviour_logprobs=s.logprobs,
            policy_versions=[version if m else OBSERVATION_VERSION for m in own[i]],
            loss_mask=[0] * n if drop else own[i],
            reward=r, advantage=a, token_advantages=token_adv,
            completion_text=getattr(s, "full_text", s.text), finish_reason=s.finish_reason,
            truncated=cut[i], turns=getattr(s, "turns", 1), tool_calls=getattr(s, "tool_calls", 0),
            env_error=getattr(s, "error", ""), reward_parts=getattr(s, "reward_parts", {}),
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
            sample.teacher, sample.teacher_version = t.teacher, t.teacher_version
        sample.verify.CopyFrom(verifier_pb2.VerifyResult(
            id=v.id, verifier=v.verifier, reward=v.reward, passed=v.passed, reason=v.reason,
            verifier_version=v.verifier_version, elapsed_s=v.elapsed_s,
            status={"ok": 1, "error": 2, "timeout": 3}[v.status]))
    return g
