"""DPO (Rafailov et al. 2023) and two variants on preference pairs, offline.

Per pair, with S = summed log-prob of a response under the policy, R = under the reference
(the stage's starting policy, computed once per row and cached), L = its token count:

* sigmoid (DPO):  l = -log sigmoid(beta * ((S_c - R_c) - (S_r - R_r)))
* ipo (IPO):      l = ((S_c - R_c)/L_c - (S_r - R_r)/L_r - 1/(2 beta))^2   (per-token means,
                  as TRL's IPO)
* simpo (SimPO, no reference): l = -log sigmoid(beta * (S_c/L_c - S_r/L_r) - gamma)

With `rpo_alpha` > 0, each pair adds rpo_alpha * (-S_c / L_c) (RPO). The loss is the mean
over the optimizer batch's pairs. Metrics: reward accuracy (chosen's
implicit reward above rejected's), mean margin, chosen/rejected rewards and log-probs.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import Field

from nebula.algo.base import Algorithm, Example, LossInput
from nebula.config.data import DatasetConfig
from nebula.config.stage import StageConfig


class DPOStage(StageConfig):
    type: Literal["dpo"] = "dpo"
    dataset: DatasetConfig = Field(..., description="Preference rows: the prompt field "
                                   "(formatted as for RL prompts) and two responses; the "
                                   "reference/verifier fields are not used.")
    chosen_field: str = Field("chosen", description="Field of the preferred response: a "
                              "string, or chat messages continuing the prompt.")
    rejected_field: str = Field("rejected", description="Field of the dispreferred response.")
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Pairs per step.")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (5% linear warm-up, then "
                      "cosine decay to 10% of it).")
    beta: float = Field(0.1, gt=0, description="Strength of the KL regulariser (DPO's beta).")
    loss: Literal["sigmoid", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid = DPO, ipo = IPO, simpo = SimPO (length-normalised, "
        "no reference model).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin gamma.")
    rpo_alpha: float = Field(0.0, ge=0, description="Weight of an NLL term on the chosen "
                             "responses (per-token mean), added to the loss as in RPO (Pang et "
                             "al. 2024): keeps DPO from lowering the chosen responses' "
                             "likelihood along with the rejected ones'. 0: off.")
    eval_dataset: DatasetConfig | None = Field(
        None, description="Held-out preference rows (same fields as `dataset`): the stage "
        "reports how often the policy gives the chosen response the higher log-prob, before "
        "and after it.")


class DPO(Algorithm):
    Config = DPOStage
    online = False
    whole_examples = True

    def _rows(self, tokenizer: Any, max_tokens: int | None = None) -> list[Any]:
        from nebula.prompts import load_preference_rows

        st = self.stage
        return load_preference_rows(st.dataset, tokenizer, st.chosen_field, st.rejected_field,
                                    max_tokens)

    def row_fields(self, dataset: DatasetConfig) -> tuple[str, ...]:
        st = self.stage
        return (st.chosen_field, st.rejected_field) \
            if dataset is st.dataset or dataset is st.eval_dataset else ()

    def preflight(self, where: str, tokenizer: Any, context_len: int,
                  train_domains: Sequence[str]) -> None:
        self._rows(tokenizer, context_len)

    def examples(self, tokenizer: Any) -> list[Example]:
        return [Example([(r.prompt_ids, r.chosen_ids), (r.prompt_ids, r.rejected_ids)])
                for r in self._rows(tokenizer)]

    def held_out(self, tokenizer: Any, sequence_logprobs: Any) -> dict[str, float]:
        """On `eval_dataset`: `pref_accuracy`, the share of pairs whose chosen response the
        policy gives the higher summed log-prob, and its mean margin; after the first call
        (the stage's start, whose log-probs are the reference's), also DPO's implicit-reward
        accuracy, the share whose chosen response gained more log-prob than the rejected one
        (TRL's eval rewards/accuracies)."""
        if self.stage.eval_dataset is None:
            return {}
        from nebula.prompts import load_preference_rows

        st = self.stage
        rows = load_preference_rows(st.eval_dataset, tokenizer, st.chosen_field,
                                    st.rejected_field)
        sums = sequence_logprobs([s for r in rows for s in ((r.prompt_ids, r.chosen_ids),
                                                            (r.prompt_ids, r.rejected_ids))])
        margins = [c - r for c, r in zip(sums[0::2], sums[1::2])]
        out = {"pref_accuracy": sum(m > 0 for m in margins) / len(margins),
               "pref_margin": sum(m for m in margins) / len(margins),
               "pref_pairs": float(len(margins))}
        ref = getattr(self, "_eval_reference", None)
        if ref is None:
            self._eval_reference = margins
        else:
            gains = [m - r for m, r in zip(margins, ref)]
            out["reward_accuracy"] = sum(g > 0 for g in gains) / len(gains)
            out["reward_margin"] = st.beta * sum(gains) / len(gains)
        return out

    def prepare(self, examples: list[Example], sequence_logprobs: Any) -> None:
        if self.stage.loss == "simpo":
            return
        todo = [e for e in examples if e.ref_logprob_sums is None]
        sums = sequence_logprobs([s for e in todo for s in e.sequences])
        for k, e in enumerate(todo):
            e.ref_logprob_sums = sums[2 * k:2 * k + 2]

    def loss(self, inp: LossInput) -> tuple[Any, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        b, st = inp.batch, self.stage
        if b.size % 2 or not torch.equal(b.group_index[0::2], b.group_index[1::2]):
            raise ValueError("dpo: a micro-batch must hold whole (chosen, rejected) pairs")
        mask = b.mask.to(inp.logprobs.dtype)
        seq = (inp.logprobs * mask).sum(-1)
        n = mask.sum(-1).clamp(min=1.0)
        ref = b.ref_logprob_sums.to(seq.dtype)
        if st.loss == "simpo":
            r = st.beta * seq / n                        # implicit reward: length-normalised
            h = r[0::2] - r[1::2] - st.simpo_gamma
            losses = -F.logsigmoid(h)
        elif st.loss == "ipo":
            r = (seq - ref) / n
            h = r[0::2] - r[1::2]
            losses = (h - 1.0 / (2.0 * st.beta)) ** 2
            r = st.beta * r
        else:
            r = st.beta * (seq - ref)
            h = r[0::2] - r[1::2]
            losses = -F.logsigmoid(h)
        if st.rpo_alpha > 0:
            losses = losses - st.rpo_alpha * seq[0::2] / n[0::2]
        loss = losses.sum() / max(inp.num_examples, 1.0)
        with torch.no_grad():
            chosen, rejected = r[0::2].detach(), r[1::2].detach()
            pairs = float(losses.numel())
            m = {"loss": float(loss.detach()), "weight": pairs,
                 "reward_accuracy": float((chosen > rejected).float().mean()),
                 "reward_margin": float((chosen - rejected).mean()),
                 "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
                 "logp_chosen": float(seq[0::2].detach().mean()),
                 "logp_rejected": float(seq[1::2].detach().mean())}
        return loss, m
