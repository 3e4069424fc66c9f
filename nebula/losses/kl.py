"""Per-token estimators of KL(pi_theta || pi_ref) from log-probs of sampled tokens.

With tokens x ~ pi_theta, logp = log pi_theta(x), ref = log pi_ref(x) and d = ref - logp:

* k1 = logp - ref = -d. Unbiased (E[k1] = KL) but high variance and can be negative per token.
* k3 = exp(d) - d - 1. Unbiased (E[exp(d)] = 1), always >= 0, lower variance (Schulman, 2020,
  "Approximating KL divergence"). Its gradient w.r.t. logp is 1 - exp(d).
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref, elementwise."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1, elementwise (>= 0)."""
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d  # exp(d) - 1 - d, accurate for small d


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token KL estimate with the named estimator ("k1" or "k3")."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")
