"""Loss functions of the learner (pure torch): SFT cross-entropy, GRPO clipped surrogate with
truncated importance sampling, KL estimators, GRPO group advantages and OPD per-token
advantages."""

from nebula.losses.grpo import group_advantages, grpo_loss
from nebula.losses.kl import kl_estimate, kl_k1, kl_k3
from nebula.losses.opd import opd_token_advantages, reverse_kl
from nebula.losses.sft import sft_loss, sft_loss_from_logits

__all__ = ["grpo_loss", "group_advantages", "kl_estimate", "kl_k1", "kl_k3",
           "opd_token_advantages", "reverse_kl", "sft_loss",
           "sft_loss_from_logits"]
