"""OPD: on-policy distillation from one teacher. The teacher scores every sampled token; the
advantage is the per-token reverse-KL log-ratio (optionally plus the outcome advantage), or
with top_k the student matches the teacher's top-k distribution (nebula/losses/distill.py)."""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import Field

from nebula.algo.grpo import GRPO
from nebula.config.stage import StageConfig


class OPDStage(StageConfig):
    """On-policy distillation: student samples scored token by token by one teacher."""

    type: Literal["opd"] = "opd"
    teacher: str = Field(..., description="Name of the teacher (hosted by the teacher service).")
    alpha: float = Field(0.0, ge=0, description="Weight of the verifier's group-normalised "
                         "outcome advantage added to the per-token reverse-KL advantage "
                         "log pi_teacher - log pi_student (0: pure distillation).")
    baseline: Literal["none", "group"] = Field(
        "group", description="Variance reduction: group = subtract the mean per-token "
        "log-ratio of the prompt's samples (the GRPO-style group baseline; the expected "
        "gradient is unchanged), none = the raw log-ratio.")
    top_k: int = Field(0, ge=0, le=1024, description="0: distil through the sampled-token "
                       "reverse-KL advantage above. k > 0: the teacher also returns its top-k "
                       "log-probs at every completion position and the student is trained to "
                       "match that distribution on its own samples (cross-entropy to the "
                       "teacher's renormalised top-k, i.e. forward KL on on-policy prefixes) "
                       "instead; alpha still adds the outcome advantage through the GRPO "
                       "surrogate. Dense per-position supervision: much faster on tasks where "
                       "the student lacks knowledge the teacher has (bench/opd_vs_grpo.py).")


class OPD(GRPO):
    Config = OPDStage

    def teachers(self) -> list[str]:
        return [self.stage.teacher]

    def teacher_for(self, domain: str) -> str:
        return self.stage.teacher

    @property
    def teacher_top_k(self) -> int:
        return self.stage.top_k

    @property
    def uses_verdicts(self) -> bool:
        return self.stage.alpha > 0  # pure distillation does not depend on the verifier

    def advantages(self, rewards: list[float], scored: list[bool], samples: Sequence[Any],
                   teacher: Sequence[Any] | None) -> list[tuple[float, list[float]]]:
        from nebula.losses.opd import group_baseline, opd_token_advantages

        assert teacher is not None
        st = self.stage
        outcome = super().advantages(rewards, scored, samples, teacher)
        if st.top_k > 0:  # the top-k loss carries the teacher; tokens keep alpha * outcome
            return [(a, [st.alpha * a] * len(s.completion_ids)) for (a, _), s
                    in zip(outcome, samples)]
        b = 0.0
        if st.baseline == "group":
            b = group_baseline([[t - s for s, t in zip(smp.logprobs, sc.logprobs)]
                                for smp, sc in zip(samples, teacher)])
        return [(a, opd_token_advantages(s.logprobs, t.logprobs, a, st.alpha, b))
                for (a, _), s, t in zip(outcome, samples, teacher)]

    def step_metrics(self, groups: Sequence[Any]) -> dict[str, Any]:
        """How far the student is from its teachers (sampled reverse KL), and who scored."""
        from collections import Counter

        from nebula.losses.opd import reverse_kl

        scored = [s for g in groups for s in g.samples if len(s.teacher_logprobs)]
        return {"reverse_kl": sum(reverse_kl(s.behaviour_logprobs, s.teacher_logprobs)
                                  for s in scored) / max(len(scored), 1),
                "teachers": dict(Counter(f"{s.teacher}@{s.teacher_version}" for s in scored))}
