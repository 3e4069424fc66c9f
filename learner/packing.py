"""Micro-batches of an optimizer batch: which sequences go together, and how they are laid out
as model input.

The losses always see a micro-batch as a `Batch`: one padded row per sequence, per-token
fields aligned with the predicting positions (see `learner.batch`). The model may see the same
sequences in one of two layouts:

* padded: one right-padded row per sequence (the `Batch`'s own `input_ids`). A causal LM needs
  no attention mask for right padding: real positions only attend to earlier, real, positions,
  and the padding positions' outputs are never read.
* packed: ONE row, the sequences' real tokens concatenated with per-sequence `position_ids`
  restarting at 0 and no padding. Attention must stay within each sequence: transformers
  detects the packing from `position_ids` when no attention mask is given and builds a
  block-diagonal causal mask (sdpa/eager), and `learner.logprobs`' segment attention runs
  each sequence separately instead (`cu_seq_lens`).

* shared prompts (`learner.share_prompts`, packed only): the samples of one group share their
  prompt, so a packed row holds it ONCE followed by each sample's completion, position ids
  continuing from the prompt's end in every completion: a tree of segments. Each completion
  attends to the prompt and to itself (the segment attention builds that mask), so every
  log-prob and gradient is what the sample would get alone, while the prompt's tokens run
  once per micro-batch instead of once per sample (GRPO's groups of 8: prompts are most of
  the tokens when answers are short).

Either way a micro-batch carries `src`/`dst`, the flat positions of the scored tokens in the
model's rows and in the `Batch`'s [S, T] layout, so log-probs computed on the model's layout
are scattered back to the layout the losses use: per-sequence normalisation, group indices and
every sequence-level metric stay as they are without packing.

Grouping: `micro_batch` sequences at a time in order (no token budget), or with
`max_tokens_per_micro_batch` by tokens: first-fit decreasing over the sequences sorted by
length, so that each micro-batch costs at most the budget (packed: the sum of its lengths;
padded: rows x longest row, what the forward pass actually processes); a sequence longer than
the budget goes alone. The losses are normalised by the whole optimizer batch's token and
sequence counts, so the grouping does not change the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from learner.batch import Batch


@dataclass
class MicroBatch:
    """One forward/backward pass: its sequences (for the losses) and the model's input rows."""

    batch: Batch                        # the sequences, padded per-token layout [S, T]
    index: torch.Tensor                 # [S] their rows in the optimizer batch
    input_ids: torch.Tensor             # [R, N] model input rows
    position_ids: torch.Tensor | None   # [R, N] (packed: from 0 per segment)
    seq_lens: list[int] | None          # packed: the segments' lengths along the one row
    src: torch.Tensor                   # [M] scored positions, flat in the rows [R * N]
    dst: torch.Tensor                   # [M] the same positions, flat in the batch [S * T]
    # Shared prompts: per segment, () for one plain sequence, or (prompt length, completion
    # lengths...) for a prompt shared by several completions. None: every segment is plain.
    branches: list[tuple[int, ...]] | None = None

    @property
    def packed(self) -> bool:
        return self.seq_lens is not None

    @property
    def model_tokens(self) -> int:
        """Tokens the forward pass processes (padding included)."""
        return int(self.input_ids.numel())

    @property
    def real_tokens(self) -> int:
        """Tokens of the sequences the forward pass processes (no padding; packed rows have
        none, and a shared prompt counts once)."""
        return self.model_tokens if self.packed else int(self.batch.lengths.sum())

    def targets(self) -> torch.Tensor:
        """[M] the token each scored position predicts."""
        return self.batch.input_ids[:, 1:].reshape(-1).index_select(0, self.dst)

    def top_ids(self) -> torch.Tensor | None:
        """[M, k] the teacher's top-k ids at the scored positions (None when k = 0)."""
        ids = self.batch.teacher_top_ids
        if ids.shape[-1] == 0:
            return None
        return ids.reshape(-1, ids.shape[-1]).index_select(0, self.dst)


def _scored(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every position that predicts a completion token: the only positions
    whose log-probs any loss or metric reads, so the LM head skips prompts and padding."""
    rows, cols = torch.nonzero(batch.completion_mask > 0, as_tuple=True)
    return rows, cols


def padded_micro_batch(batch: Batch, index: torch.Tensor | None = None) -> MicroBatch:
    """The sequences of `batch` as right-padded rows, one per sequence."""
    rows, cols = _scored(batch)
    T, L = batch.mask.shape[1], batch.input_ids.shape[1]
    if index is None:
        index = torch.arange(batch.size, device=batch.input_ids.device)
    return MicroBatch(batch=batch, index=index, input_ids=batch.input_ids, position_ids=None,
                      seq_lens=None, src=rows * L + cols, dst=rows * T + cols)


def packed_micro_batch(batch: Batch, index: torch.Tensor | None = None) -> MicroBatch:
    """The sequences of `batch` concatenated into one row without padding."""
    return _packed_row(batch, [[r] for r in range(batch.size)], index)


def shared_micro_batch(batch: Batch, index: torch.Tensor | None = None) -> MicroBatch:
    """The sequences of `batch` packed into one row, each prompt once per `prompt_runs` run
    followed by its rows' completions (see the module docstring)."""
    return _packed_row(batch, prompt_runs(batch), index)


def prompt_runs(batch: Batch) -> list[list[int]]:
    """Rows that can share one prompt: same group and identical non-empty prompt tokens, in
    order of first appearance (a row with an empty prompt is alone: its first completion token
    has no predicting position to share)."""
    runs: dict[tuple, list[int]] = {}
    for row, (g, p) in enumerate(zip(batch.group_index.tolist(), batch.prompt_lens.tolist())):
        key = (g, tuple(batch.input_ids[row, :p].tolist())) if p else ("alone", row)
        runs.setdefault(key, []).append(row)
    return list(runs.values())


def _packed_row(batch: Batch, runs: list[list[int]], index: torch.Tensor | None) -> MicroBatch:
    """One row of segments, one per run of rows sharing a prompt: the prompt once, then each
    row's completion with position ids continuing from the prompt's end (a run of one row is
    a plain sequence, positions 0..n-1)."""
    dev = batch.input_ids.device
    P = batch.prompt_lens.tolist()
    C = (batch.lengths - batch.prompt_lens).tolist()
    ids, pos, seq_lens, branches = [], [], [], []
    prompt_at = [0] * batch.size   # flat offset of each row's prompt in the packed row
    comp_at = [0] * batch.size     # ... and of its completion
    offset = 0
    for run in runs:
        p = P[run[0]]
        ids.append(batch.input_ids[run[0], :p])
        pos.append(torch.arange(p, device=dev))
        start, at = offset, offset + p
        for r in run:
            ids.append(batch.input_ids[r, p:p + C[r]])
            pos.append(torch.arange(p, p + C[r], device=dev))
            prompt_at[r], comp_at[r] = start, at
            at += C[r]
        seq_lens.append(at - start)
        branches.append(() if len(run) == 1 else (p, *(C[r] for r in run)))
        offset = at
    rows, cols = _scored(batch)
    T = batch.mask.shape[1]
    p_rows = batch.prompt_lens[rows]
    src = torch.where(cols < p_rows, torch.tensor(prompt_at, device=dev)[rows] + cols,
                      torch.tensor(comp_at, device=dev)[rows] + cols - p_rows)
    if index is None:
        index = torch.arange(batch.size, device=dev)
    return MicroBatch(batch=batch, index=index, input_ids=torch.cat(ids).unsqueeze(0),
                      position_ids=torch.cat(pos).unsqueeze(0), seq_lens=seq_lens, src=src,
                      dst=rows * T + cols, branches=branches if any(branches) else None)


def shared_bins(batch: Batch, max_tokens: int) -> list[list[int]]:
    """Token-budget bins of whole prompt runs (a run's cost: its prompt once plus its
    completions; a run over the budget is split into pieces that each repeat the prompt),
    first-fit decreasing by cost (`token_bins` over the pieces)."""
    P = batch.prompt_lens.tolist()
    C = (batch.lengths - batch.prompt_lens).tolist()
    pieces: list[list[int]] = []
    costs: list[int] = []
    for run in prompt_runs(batch):
        cost, piece = P[run[0]], []
        for r in run:
            if piece and cost + C[r] > max_tokens:
                pieces.append(piece)
                costs.append(cost)
                cost, piece = P[run[0]], []
            piece.append(r)
            cost += C[r]
        pieces.append(piece)
        costs.append(cost)
    return [[r for k in b for r in pieces[k]] for b in token_bins(costs, max_tokens, True)]


def token_bins(lengths: Sequence[int], max_tokens: int, packing: bool) -> list[list[int]]:
    """Sequence indices grouped so that each group costs at most `max_tokens` (packed: sum of
    lengths; padded: count x longest), first-fit decreasing; an over-long sequence is alone.
    Groups hold their sequences longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    cost: list[int] = []
    for i in order:
        n = int(lengths[i])
        for b, members in enumerate(bins):
            # Sorted longest first: a bin's first member is its longest row.
            new = cost[b] + n if packing else (len(members) + 1) * lengths[members[0]]
            if new <= max_tokens:
                members.append(i)
                cost[b] = new
                break
        else:
            bins.append([i])
            cost.append(n)
    return bins


def whole_group_bins(batch: Batch, micro_batch: int, max_tokens: int | None, packing: bool
                     ) -> list[list[int]]:
    """Consecutive rows in order, never splitting a group (`group_index`: e.g. DPO's chosen and
    rejected rows, whose loss needs both): a micro-batch takes whole groups while it stays
    within `micro_batch` rows (or, with `max_tokens`, the token budget); a group larger than
    that goes alone."""
    lengths = [int(n) for n in batch.lengths.tolist()]
    groups: list[list[int]] = []
    for row, g in enumerate(batch.group_index.tolist()):
        if groups and batch.group_index[groups[-1][0]] == g:
            groups[-1].append(row)
        else:
            groups.append([row])
    bins: list[list[int]] = []
    for members in groups:
        if bins:
            rows = bins[-1] + members
            if max_tokens is None:
                fits = len(rows) <= micro_batch
            else:
                longest = max(lengths[r] for r in rows)
                cost = sum(lengths[r] for r in rows) if packing else len(rows) * longest
                fits = cost <= max_tokens
            if fits:
                bins[-1] = rows
                continue
        bins.append(list(members))
    return bins


def plan_micro_batches(batch: Batch, micro_batch: int, max_tokens: int | None = None,
                       packing: bool = True, whole_groups: bool = False,
                       share_prompts: bool = False) -> list[MicroBatch]:
    """The micro-batches of one optimizer step (see the module docstring): `micro_batch`
    consecutive sequences each (padded) when `max_tokens` is None, else token-budget groups,
    packed into one row each when `packing`; with `whole_groups`, consecutive whole groups
    (`whole_group_bins`). `share_prompts` (packed rows only) packs each group's prompt once
    (`shared_bins`, `shared_micro_batch`)."""
    if whole_groups:
        groups = whole_group_bins(batch, micro_batch, max_tokens, packing)
        packing = packing and max_tokens is not None
    elif max_tokens is None:
        size = max(int(micro_batch), 1)
        groups = [list(range(i, min(i + size, batch.size))) for i in range(0, batch.size, size)]
        packing = False
    elif packing and share_prompts:
        groups = shared_bins(batch, int(max_tokens))
    else:
        groups = token_bins([int(n) for n in batch.lengths.tolist()], int(max_tokens), packing)
    make = padded_micro_batch
    if packing:
        make = shared_micro_batch if share_prompts else packed_micro_batch
    out = []
    for g in groups:
        index = torch.tensor(g, dtype=torch.long, device=batch.input_ids.device)
        out.append(make(batch.select(index), index))
    return out
