"""On-policy distillation (OPD/MOPD) advantages.

The student samples a completion; the teacher scores each sampled token. The per-token
advantage is the negative per-token reverse KL estimate, log pi_teacher(y_t) - log
pi_student(y_t): tokens the teacher finds likelier than the student are pushed up, the rest
down. It then goes through the same clipped, importance-corrected surrogate as GRPO
(nebula/losses/grpo.py), so stale samples are handled the same way. Optionally the
verifier's group-normalised outcome advantage is mixed in with weight alpha, and a group
baseline (the mean log-ratio of the prompt's samples) can be subtracted.
"""

from __future__ import annotations

from collections.abc import Sequence


def opd_token_advantages(student_logprobs: Sequence[float], teacher_logprobs: Sequence[float],
                         outcome_advantage: float = 0.0, alpha: float = 0.0,
                         baseline: float = 0.0) -> list[float]:
    """A_t = -(log pi_student(y_t) - log pi_teacher(y_t)) - baseline + alpha * A_outcome.

    `student_logprobs` are the behaviour log-probs recorded at sampling time (the policy that
    produced the tokens), `teacher_logprobs` the teacher's, one per completion token.
    """
    if len(student_logprobs) != len(teacher_logprobs):
        raise ValueError(f"{len(student_logprobs)} student log-probs for "
                         f"{len(teacher_logprobs)} teacher log-probs")
    bonus = alpha * outcome_advantage - baseline
    return [float(t) - float(s) + bonus for s, t in zip(student_logprobs, teacher_logprobs)]


def group_baseline(per_sample: Sequence[Sequence[float]]) -> float:
    """Mean per-token log-ratio over all tokens of a prompt's samples: subtracting it from
    every token's advantage is a baseline (it does not depend on the token it is applied to
    beyond a 1/N share), so the expected gradient stays that of the reverse KL while its
    variance drops: without it, almost every sampled token of a weak student has a negative
    advantage and probability mass drifts to tokens never sampled."""
    n = sum(len(x) for x in per_sample)
    return sum(float(v) for x in per_sample for v in x) / n if n else 0.0


def reverse_kl(student_logprobs: Sequence[float], teacher_logprobs: Sequence[float]) -> float:
    """Mean over tokens of log pi_student - log pi_teacher (the sampled reverse-KL estimate)."""
    n = len(student_logprobs)
    if n == 0:
        return 0.0
    return sum(float(s) - float(t) for s, t in zip(student_logprobs, teacher_logprobs)) / n
