"""Learner/engine agreement: how far the learner's log-probs of the sampled tokens, before the
optimizer step (`old`), are from the rollout engine's behaviour log-probs on the same tokens.

On a token sampled by the policy the learner holds (fresh: its policy version equals the
learner's current version) the two should agree up to numerics (kernels, dtype: a bf16 engine
against an fp32 learner); a growing gap there means the engine and the learner no longer
compute the same policy - a wrong weight sync, a tokenizer or temperature mismatch - which
other RL frameworks name the most common cause of a silent collapse. Stale tokens (older
versions) differ for a legitimate reason, which the importance weights correct.

With d = old - beh per token that has behaviour log-probs:

* logprob_diff_abs_mean = mean |d|
* logprob_diff_abs_max  = max |d|
* mismatch_kl_k3        = mean (exp(d) - d - 1): the k3 estimator of KL(behaviour || learner)
  (tokens are drawn from the behaviour policy; the ratio learner/behaviour is exp(d))

each over all such tokens and, with the suffix `_fresh`, over the fresh ones only;
`mismatch_tokens` / `mismatch_fresh_tokens` count them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from learner.batch import Batch


@dataclass
class LogprobMismatch:
    """Sums over the micro-batches of one optimizer step; `metrics()` gives the means."""

    tokens: float = 0.0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    k3_sum: float = 0.0
    fresh_tokens: float = 0.0
    fresh_abs_sum: float = 0.0
    fresh_abs_max: float = 0.0
    fresh_k3_sum: float = 0.0

    @torch.no_grad()
    def add(self, old: torch.Tensor, batch: Batch, version: int) -> None:
        """old: [S, T] learner log-probs before the step, in `batch`'s layout; `version`:
        the learner's policy version before the step."""
        sel = batch.has_behaviour
        d = (old.detach().float() - batch.behaviour_logprobs.float())[sel]
        fresh = (batch.policy_versions[sel] == int(version))
        k3 = torch.expm1(d) - d  # exp(d) - 1 - d, accurate for small d
        self.tokens += float(d.numel())
        self.abs_sum += float(d.abs().sum())
        self.abs_max = max(self.abs_max, float(d.abs().max()) if d.numel() else 0.0)
        self.k3_sum += float(k3.sum())
        df = d[fresh]
        self.fresh_tokens += float(df.numel())
        self.fresh_abs_sum += float(df.abs().sum())
        self.fresh_abs_max = max(self.fresh_abs_max, float(df.abs().max()) if df.numel() else 0.0)
        self.fresh_k3_sum += float(k3[fresh].sum())

    @classmethod
    def merged(cls, parts: list[LogprobMismatch]) -> LogprobMismatch:
        """One step's sums over several ranks' shares."""
        out = cls()
        for p in parts:
            out.tokens += p.tokens
            out.abs_sum += p.abs_sum
            out.abs_max = max(out.abs_max, p.abs_max)
            out.k3_sum += p.k3_sum
            out.fresh_tokens += p.fresh_tokens
            out.fresh_abs_sum += p.fresh_abs_sum
            out.fresh_abs_max = max(out.fresh_abs_max, p.fresh_abs_max)
            out.fresh_k3_sum += p.fresh_k3_sum
        return out

    def metrics(self) -> dict[str, float]:
        """Means over the tokens seen; a group of metrics is left out when it saw no token
        (a 0 there would read as perfect agreement)."""
        out = {"mismatch_tokens": self.tokens, "mismatch_fresh_tokens": self.fresh_tokens}
        if self.tokens:
            out.update(logprob_diff_abs_mean=self.abs_sum / self.tokens,
                       logprob_diff_abs_max=self.abs_max, mismatch_kl_k3=self.k3_sum / self.tokens)
        if self.fresh_tokens:
            nf = self.fresh_tokens
            out.update(logprob_diff_abs_mean_fresh=self.fresh_abs_sum / nf,
                       logprob_diff_abs_max_fresh=self.fresh_abs_max,
                       mismatch_kl_k3_fresh=self.fresh_k3_sum / nf)
        return out
