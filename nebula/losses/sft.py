"""Supervised fine-tuning loss: cross-entropy on completion (target) tokens only.

With l_t = log p_theta(y_t | y_<t) the log-prob of target token t and m_t in {0, 1} its mask
(1 on completion tokens, 0 on prompt and padding),

    L = - sum_t m_t * l_t / N,   N = sum_t m_t  (or a caller-given N for the whole batch)

i.e. the mean negative log-likelihood over target tokens of the batch. With micro-batches,
pass the token count of the whole optimizer batch as `num_tokens` so that the micro-batch
losses add up to the batch mean.
"""

from __future__ import annotations

import torch


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor,
             num_tokens: float | None = None) -> torch.Tensor:
    """Mean NLL over masked tokens.

    Args:
        logprobs: [B, T] log-probs of the target tokens (see `learner.batch.token_logprobs`).
        mask: [B, T] 1 where the token is a training target, 0 elsewhere.
        num_tokens: normaliser; default the number of masked tokens here (at least 1).
    """
    mask = mask.to(logprobs.dtype)
    denom = float(num_tokens) if num_tokens is not None else max(float(mask.sum()), 1.0)
    return -(logprobs * mask).sum() / denom


def sft_loss_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                         num_tokens: float | None = None) -> torch.Tensor:
    """Same loss from causal-LM logits [B, L, V] and token ids [B, L].

    Position t of the logits predicts token t + 1, so `mask` is [B, L - 1] and aligned with
    the predicting positions (as `learner.batch.Batch.mask`).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = torch.gather(logp, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return sft_loss(target, mask, num_tokens)
