"""GRPO policy loss: PPO clipped surrogate with clip-higher, truncated importance sampling for
stale samples, optional KL to a reference policy, and the group-normalised advantage.

Notation, per completion token t of sequence b (all [B, T] tensors, aligned):

* logp    = log pi_theta(x_t)          learner log-prob, with gradient
* old     = log pi_theta_old(x_t)      learner log-prob before this optimizer step (detached)
* beh     = log pi_behaviour(x_t)      log-prob under the (possibly older) rollout policy
* A       = advantage of the token     (outcome advantage broadcast, or per-token for OPD)
* m       = 1 where the token counts in the loss

Surrogate (clip-higher, DAPO):

    r      = exp(logp - old)
    pg_t   = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)

Truncated importance-sampling correction for off-policy (stale) samples, as in TIS / AReaL's
decoupled PPO objective:

    w_t    = min(exp(old - beh), is_cap)      (detached; w_t = 1 when is_cap is None)

Per-token loss, with an optional KL penalty (estimators in `nebula.losses.kl`):

    l_t    = w_t * pg_t + kl_coef * KL_t(logp, ref)

Normalisation:

* "token":    L = sum_{b,t} m * l / N,         N = number of masked tokens in the batch
* "sequence": L = (1/S) sum_b [sum_t m * l / n_b],   n_b = masked tokens of sequence b,
               S = sequences with n_b > 0

Gradient of one unclipped token w.r.t. logp (token norm): dL/dlogp = -w * A * r / N; a clipped
token (the clipped term is the minimum) gets 0. With k3, the KL term adds
kl_coef * (1 - exp(ref - logp)) / N.

With micro-batches, pass `num_tokens` / `num_sequences` of the whole optimizer batch so the
micro-batch losses add up to the loss of the batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from nebula.losses.kl import KLEstimator, kl_estimate

LossNorm = Literal["token", "sequence"]


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    loss_norm: LossNorm = "token",
    is_cap: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss (see the module docstring for the math).

    Args:
        logprobs: [B, T] learner log-probs of the sampled tokens (with gradient).
        old_logprobs: [B, T] learner log-probs before this optimizer step (detached here).
        behaviour_logprobs: [B, T] rollout-policy log-probs, or None (no IS correction).
        advantages: [B, T] per-token advantages.
        mask: [B, T] 1 for tokens in the loss, 0 for prompt/padding/masked tokens.
        clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high].
        loss_norm: "token" or "sequence".
        is_cap: cap of the truncated IS weight; None disables the correction.
        ref_logprobs: [B, T] reference-policy log-probs for the KL penalty (or None).
        kl_coef: KL penalty weight (0: off).
        kl_estimator: "k1" or "k3".
        num_tokens: "token" normaliser (default: masked tokens here).
        num_sequences: "sequence" normaliser (default: sequences with a masked token here).

    Returns:
        (loss, metrics): metrics are means over the masked tokens of this call
        (clip_frac, clip_frac_low, clip_frac_high, ratio_mean, is_weight_mean,
        is_truncated_frac, kl, pg_loss, entropy_approx) plus `tokens`, `sequences` and `loss`.
    """
    if loss_norm not in ("token", "sequence"):
        raise ValueError(f"loss_norm must be 'token' or 'sequence', not {loss_norm!r}")
    mask_f = mask.to(logprobs.dtype)
    old = old_logprobs.detach().to(logprobs.dtype)
    adv = advantages.detach().to(logprobs.dtype)

    ratio = torch.exp(logprobs - old)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    surr1 = ratio * adv
    surr2 = clipped_ratio * adv
    pg = -torch.minimum(surr1, surr2)

    if is_cap is not None and behaviour_logprobs is not None:
        raw_w = torch.exp(old - behaviour_logprobs.detach().to(logprobs.dtype))
        is_weight = torch.clamp(raw_w, max=is_cap)
        truncated = raw_w > is_cap
    else:
        is_weight = torch.ones_like(old)
        truncated = torch.zeros_like(mask_f, dtype=torch.bool)
    per_token = is_weight * pg

    kl = None
    if ref_logprobs is not None and kl_coef > 0:
        kl = kl_estimate(logprobs, ref_logprobs.detach().to(logprobs.dtype), kl_estimator)
        per_token = per_token + kl_coef * kl

    tok_per_seq = mask_f.sum(dim=-1)
    n_tok = float(tok_per_seq.sum())
    n_seq = float((tok_per_seq > 0).sum())
    if loss_norm == "token":
        denom = float(num_tokens) if num_tokens is not None else max(n_tok, 1.0)
        loss = (per_token * mask_f).sum() / denom
    else:
        seq_mean = (per_token * mask_f).sum(dim=-1) / tok_per_seq.clamp(min=1.0)
        denom = float(num_sequences) if num_sequences is not None else max(n_seq, 1.0)
        loss = seq_mean.sum() / denom

    with torch.no_grad():
        n = max(n_tok, 1.0)
        m_bool = mask_f > 0

        def tmean(x: torch.Tensor) -> float:
            return float((x.to(mask_f.dtype) * mask_f).sum() / n)

        clip_low_active = (surr2 < surr1) & (adv < 0)   # r < 1 - clip_low
        clip_high_active = (surr2 < surr1) & (adv > 0)  # r > 1 + clip_high
        metrics = {
            "loss": float(loss.detach()),
            "pg_loss": tmean(is_weight * pg),
            "clip_frac": tmean(clip_low_active | clip_high_active),
            "clip_frac_low": tmean(clip_low_active),
            "clip_frac_high": tmean(clip_high_active),
            "ratio_mean": tmean(ratio),
            "ratio_max": float(ratio[m_bool].max()) if n_tok > 0 else 1.0,
            "is_weight_mean": tmean(is_weight),
            "is_truncated_frac": tmean(truncated),
            "kl": tmean(kl) if kl is not None else 0.0,
            "entropy_approx": tmean(-logprobs),
            "tokens": n_tok,
            "sequences": n_seq,
        }
    return loss, metrics


def group_advantages(rewards: list[float], eps: float = 1e-6,
                     scale: Literal["std", "none"] = "std") -> list[float]:
    """Group-normalised (GRPO) advantages of one prompt's samples.

    A_i = (r_i - mean(r)) / (std(r) + eps) with the population std (scale="std"), or
    A_i = r_i - mean(r) (scale="none", Dr. GRPO). All zeros when every reward is equal.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', not {scale!r}")
    n = len(rewards)
    if n == 0:
        return []
    rs = [float(r) for r in rewards]
    if max(rs) == min(rs):
        return [0.0] * n
    mean = sum(rs) / n
    centred = [r - mean for r in rs]
    if scale == "none":
        return centred
    std = math.sqrt(sum(c * c for c in centred) / n)
    return [c / (std + eps) for c in centred]
