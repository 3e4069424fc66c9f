"""GRPO: group-normalised outcome advantages, the clipped, importance-corrected surrogate."""

from __future__ import annotations

from typing import Any, Literal, Sequence

from nebula.algo.base import Algorithm, LossInput
from nebula.config.stage import StageConfig


class GRPOStage(StageConfig):
    type: Literal["grpo"] = "grpo"


class GRPO(Algorithm):
    Config = GRPOStage

    def advantages(self, rewards: list[float], scored: list[bool], samples: Sequence[Any],
                   teacher: Sequence[Any] | None) -> list[tuple[float, list[float]]]:
        from nebula.losses.grpo import group_advantages

        adv = iter(group_advantages([r for r, ok in zip(rewards, scored) if ok]))
        return [(next(adv) if ok else 0.0, []) for ok in scored]

    kl_penalty = True

    def loss(self, inp: LossInput) -> tuple[Any, dict[str, float]]:
        """The clipped surrogate on the batch's advantages (nebula/losses/grpo.py); where the
        samples carry a teacher's top-k (opd/mopd with top_k), plus the top-k distillation
        loss (nebula/losses/distill.py)."""
        import torch

        from nebula.losses.grpo import grpo_loss

        b, c = inp.batch, inp.learner
        # Tokens without behaviour log-probs get no importance correction (weight 1).
        beh = torch.where(b.has_behaviour, b.behaviour_logprobs, inp.old_logprobs)
        loss, m = grpo_loss(inp.logprobs, inp.old_logprobs, beh, b.advantages, b.mask,
                            c.clip_low, c.clip_high, c.loss_norm, c.is_cap, inp.ref_logprobs,
                            c.kl.coef if inp.ref_logprobs is not None else 0.0, c.kl.estimator,
                            num_tokens=inp.num_tokens, num_sequences=inp.num_sequences)
        m["sequences"] = float(b.num_sequences)
        if inp.top_logprobs is not None:
            from nebula.losses.distill import topk_distill_loss

            d_loss, dm = topk_distill_loss(inp.top_logprobs, b.teacher_top_logprobs,
                                           b.mask * b.has_top, num_tokens=inp.num_top)
            loss = loss + d_loss
            m.update(dm, loss=m["loss"] + float(d_loss.detach()))
        return loss, m
