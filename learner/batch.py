"""Turn trajectory groups (or SFT pairs) into padded training tensors.

Layout: every sample becomes one row `prompt_ids + completion_ids`, right-padded to the longest
row (L tokens). A causal LM's logits at position t predict token t + 1, so all per-token
tensors have T = L - 1 columns and are aligned with the *predicting* positions: completion
token j of a sample with prompt length P sits at input position P + j and is predicted at
column P + j - 1. `mask[b, t]` is 1 exactly at the columns that predict a completion token
whose `loss_mask` is 1 (when a prompt is empty, the first completion token has no predicting
position and is left out).

This is the layout the losses see. How a micro-batch's sequences reach the model (padded rows
or one packed row) is `learner.packing`'s business; log-probs come back in this layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Sequence

import torch

from nebula.env.base import OBSERVATION_VERSION

if TYPE_CHECKING:  # pragma: no cover
    from nebula.v1.trajectory_pb2 import TrajectoryGroup


@dataclass
class Batch:
    """Padded tensors of B sequences of at most L tokens (per-token fields are [B, L - 1])."""

    input_ids: torch.Tensor            # [B, L] long, prompt + completion, right-padded
    attention_mask: torch.Tensor       # [B, L] long, 1 on real tokens
    mask: torch.Tensor                 # [B, T] float, 1 at positions predicting a trained token
    completion_mask: torch.Tensor      # [B, T] float, 1 at positions predicting any completion token
    behaviour_logprobs: torch.Tensor   # [B, T] float (0 where unknown)
    has_behaviour: torch.Tensor        # [B, T] bool, True where behaviour log-probs were given
    advantages: torch.Tensor           # [B, T] float per-token advantage
    policy_versions: torch.Tensor      # [B, T] long, -1 where unknown / not a completion token
    teacher_logprobs: torch.Tensor     # [B, T] float (0 where not given)
    has_teacher: torch.Tensor          # [B, T] bool
    teacher_top_ids: torch.Tensor      # [B, T, k] long, teacher top-k ids (k = 0: none given)
    teacher_top_logprobs: torch.Tensor  # [B, T, k] float, their teacher log-probs
    has_top: torch.Tensor              # [B, T] bool, True where the teacher top-k was given
    rewards: torch.Tensor              # [B] float
    prompt_lens: torch.Tensor          # [B] long
    completion_lens: torch.Tensor      # [B] long
    group_index: torch.Tensor          # [B] long, index of the sample's group in the input
    ref_logprob_sums: torch.Tensor     # [B] float, reference policy's summed target log-prob

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens in the loss."""
        return int(self.mask.sum())

    @property
    def num_sequences(self) -> int:
        """Sequences with at least one token in the loss."""
        return int((self.mask.sum(dim=-1) > 0).sum())

    def to(self, device: Any) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def lengths(self) -> torch.Tensor:
        """[B] real (unpadded) tokens of each row."""
        return self.attention_mask.sum(dim=-1)

    def select(self, index: Sequence[int] | torch.Tensor) -> Batch:
        """The rows `index` (in that order), with the padding columns beyond their longest row
        dropped."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        rows = {f.name: getattr(self, f.name).index_select(0, idx) for f in fields(self)}
        length = int(rows["attention_mask"].sum(dim=-1).max()) if idx.numel() else 1
        length = max(length, 2)
        for name, value in rows.items():
            if value.dim() >= 2:
                width = length if name in ("input_ids", "attention_mask") else length - 1
                rows[name] = value[:, :width]
        return Batch(**rows)

    def slice(self, start: int, end: int) -> Batch:
        """Rows [start, end), with the padding columns beyond the slice's longest row dropped."""
        return self.select(range(start, end))

    def micro_batches(self, size: int) -> list[Batch]:
        """Consecutive slices of at most `size` rows."""
        size = max(int(size), 1)
        return [self.slice(i, min(i + size, self.size)) for i in range(0, self.size, size)]


def _rows_to_batch(rows: Sequence[dict[str, Any]], pad_id: int, device: Any) -> Batch:
    """rows: dicts with prompt, completion, loss_mask, behaviour, advantages, versions,
    teacher (lists or None), reward, group, and optionally top_k with flat top_ids /
    top_logprobs (top_k entries per completion token)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    B = len(rows)
    L = max(2, max(len(r["prompt"]) + len(r["completion"]) for r in rows))
    T = L - 1
    input_ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    completion_mask = torch.zeros((B, T), dtype=torch.float32)
    behaviour = torch.zeros((B, T), dtype=torch.float32)
    has_behaviour = torch.zeros((B, T), dtype=torch.bool)
    advantages = torch.zeros((B, T), dtype=torch.float32)
    versions = torch.full((B, T), -1, dtype=torch.long)
    teacher = torch.zeros((B, T), dtype=torch.float32)
    has_teacher = torch.zeros((B, T), dtype=torch.bool)
    k = max((int(r.get("top_k") or 0) for r in rows), default=0)
    top_ids = torch.zeros((B, T, k), dtype=torch.long)
    top_lp = torch.full((B, T, k), -math.inf, dtype=torch.float32)
    has_top = torch.zeros((B, T), dtype=torch.bool)
    rewards = torch.zeros(B, dtype=torch.float32)
    prompt_lens = torch.zeros(B, dtype=torch.long)
    completion_lens = torch.zeros(B, dtype=torch.long)
    group_index = torch.zeros(B, dtype=torch.long)
    ref_sums = torch.zeros(B, dtype=torch.float32)

    for b, r in enumerate(rows):
        prompt, completion = list(r["prompt"]), list(r["completion"])
        P, C = len(prompt), len(completion)
        n = P + C
        input_ids[b, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[b, :n] = 1
        rewards[b] = float(r.get("reward", 0.0))
        prompt_lens[b], completion_lens[b] = P, C
        group_index[b] = int(r.get("group", b))
        ref_sums[b] = float(r.get("ref_sum", 0.0))
        if C == 0:
            continue
        # Completion token j is predicted at column P + j - 1; drop j where that is < 0.
        j0 = 1 if P == 0 else 0
        cols = slice(P + j0 - 1, P + C - 1)
        sel = slice(j0, C)

        def put(dst: torch.Tensor, values: Sequence[float] | None, name: str,
                flag: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> None:
            if values is None or len(values) == 0:
                return
            if len(values) != C:
                raise ValueError(f"sample {b}: {name} has {len(values)} entries for "
                                 f"{C} completion tokens")
            dst[b, cols] = torch.tensor(list(values), dtype=dtype)[sel]
            if flag is not None:
                flag[b, cols] = True

        lm = r.get("loss_mask")
        if lm is None or len(lm) == 0:
            lm = [1] * C
        put(mask, [1.0 if x else 0.0 for x in lm], "loss_mask")
        completion_mask[b, cols] = 1.0
        put(behaviour, r.get("behaviour"), "behaviour_logprobs", has_behaviour)
        adv = r.get("advantages")
        if adv is None or len(adv) == 0:
            advantages[b, cols] = float(r.get("advantage", 0.0))
        else:
            put(advantages, adv, "token_advantages")
        put(versions, r.get("versions"), "policy_versions", dtype=torch.long)
        if r.get("versions"):  # an environment's token (observation): no behaviour log-prob
            has_behaviour[b, cols] &= versions[b, cols] != OBSERVATION_VERSION
        put(teacher, r.get("teacher"), "teacher_logprobs", has_teacher)
        rk = int(r.get("top_k") or 0)
        if rk:
            ids, lps = list(r["top_ids"]), list(r["top_logprobs"])
            if len(ids) != C * rk or len(lps) != C * rk:
                raise ValueError(f"sample {b}: teacher top-{rk} has {len(ids)} ids and "
                                 f"{len(lps)} log-probs for {C} completion tokens")
            top_ids[b, cols, :rk] = torch.tensor(ids, dtype=torch.long).view(C, rk)[sel]
            top_lp[b, cols, :rk] = torch.tensor(lps, dtype=torch.float32).view(C, rk)[sel]
            has_top[b, cols] = True

    batch = Batch(input_ids=input_ids, attention_mask=attention_mask, mask=mask,
                  completion_mask=completion_mask, behaviour_logprobs=behaviour,
                  has_behaviour=has_behaviour, advantages=advantages, policy_versions=versions,
                  teacher_logprobs=teacher, has_teacher=has_teacher, teacher_top_ids=top_ids,
                  teacher_top_logprobs=top_lp, has_top=has_top, rewards=rewards,
                  prompt_lens=prompt_lens, completion_lens=completion_lens,
                  group_index=group_index, ref_logprob_sums=ref_sums)
    return batch.to(device) if device is not None else batch


def collate(groups: Sequence[TrajectoryGroup], pad_id: int, device: Any = None) -> Batch:
    """One row per sample of every group, in order (group 0's samples first).

    Per-token advantages are `sample.token_advantages` when given, else `sample.advantage`
    broadcast over the completion tokens; `sample.loss_mask` (empty: all ones) decides which
    completion tokens are trained.
    """
    rows = []
    for g, group in enumerate(groups):
        for s in group.samples:
            rows.append({
                "prompt": group.prompt_ids, "completion": s.completion_ids,
                "loss_mask": list(s.loss_mask), "behaviour": list(s.behaviour_logprobs),
                "advantage": s.advantage, "advantages": list(s.token_advantages),
                "versions": list(s.policy_versions), "teacher": list(s.teacher_logprobs),
                "reward": s.reward, "group": g, "top_k": s.teacher_top_k,
                "top_ids": s.teacher_top_ids, "top_logprobs": s.teacher_top_logprobs,
            })
    return _rows_to_batch(rows, pad_id, device)


def collate_sft(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                device: Any = None) -> Batch:
    """SFT batch from (prompt_ids, target_ids) pairs: the loss covers the target tokens."""
    rows = [{"prompt": list(p), "completion": list(c), "group": i}
            for i, (p, c) in enumerate(pairs)]
    return _rows_to_batch(rows, pad_id, device)


def collate_examples(examples: Sequence[Any], pad_id: int, device: Any = None) -> Batch:
    """Batch of offline examples (`nebula.algo.Example`): each sequence one row, in order,
    its example's index as `group_index` and its cached reference log-prob sum (if any)."""
    rows = []
    for i, ex in enumerate(examples):
        refs = ex.ref_logprob_sums or [0.0] * len(ex.sequences)
        for (p, c), ref in zip(ex.sequences, refs):
            rows.append({"prompt": list(p), "completion": list(c), "group": i, "ref_sum": ref})
    return _rows_to_batch(rows, pad_id, device)


def token_logprobs(model: Any, batch: Batch, temperature: float = 1.0,
                   with_top: bool = False) -> Any:
    """[B, L - 1] log_softmax(logits / temperature) at the next token of every position that
    predicts a completion token (0 at the other columns), computed chunk by chunk in float32.

    `model` is a Hugging Face causal LM or a DeepSpeed engine wrapping one. With `with_top`,
    returns a pair: those and [B, L - 1, k] the same log-probs at the batch's teacher top-k
    ids. A convenience over `learner.logprobs.micro_batch_logprobs` for a padded batch.
    """
    from learner.logprobs import micro_batch_logprobs
    from learner.packing import padded_micro_batch

    out = micro_batch_logprobs(model, padded_micro_batch(batch), temperature,
                               with_top=with_top)
    return (out.token, out.top) if with_top else out.token
