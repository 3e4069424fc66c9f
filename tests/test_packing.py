"""Micro-batch planning (learner/packing.py): token-budget bins, packed rows and the mapping of
scored positions back to each sequence's per-token layout. Pure tensor code, no model."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from learner.batch import collate  # noqa: E402
from learner.packing import (packed_micro_batch, padded_micro_batch,  # noqa: E402
                             plan_micro_batches, shared_bins, shared_micro_batch, token_bins)
from nebula.v1.trajectory_pb2 import TrajectoryGroup  # noqa: E402


def _groups(lengths: list[tuple[int, int]]) -> list[TrajectoryGroup]:
    """One group per (prompt length, completion length), ids distinct per sequence."""
    out = []
    for g, (p, c) in enumerate(lengths):
        group = TrajectoryGroup(group_id=f"g{g}", prompt_ids=[100 * g + i for i in range(p)])
        group.samples.add(completion_ids=[100 * g + 50 + i for i in range(c)],
                          behaviour_logprobs=[-float(g)] * c, advantage=float(g))
        out.append(group)
    return out


def test_token_bins_budget_and_long_sequence_alone() -> None:
    lengths = [5, 9, 3, 20, 4, 6]
    for packing in (True, False):
        bins = token_bins(lengths, 10, packing)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        for b in bins:
            cost = (sum(lengths[i] for i in b) if packing
                    else len(b) * max(lengths[i] for i in b))
            assert cost <= 10 or b == [3]  # the 20-token sequence goes alone
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # packed first-fit decreasing: 20 | 9 | 6+4 | 5+3 ; padded: 20 | 9 | 6 | 5+4 | 3 ...
    assert token_bins(lengths, 10, True) == [[3], [1], [5, 4], [0, 2]]
    assert token_bins(lengths, 10, False) == [[3], [1], [5], [0, 4], [2]]


def test_plan_fixed_count_and_token_budget() -> None:
    batch = collate(_groups([(2, 3), (4, 8), (1, 2), (3, 3)]), pad_id=0)
    fixed = plan_micro_batches(batch, micro_batch=3)
    assert [mb.index.tolist() for mb in fixed] == [[0, 1, 2], [3]]
    assert not any(mb.packed for mb in fixed)
    # lengths 5, 12, 3, 6; budget 14: packed 12 | 6 + 5 + 3, padded 12 | 2 x 6 | 3
    packed = plan_micro_batches(batch, micro_batch=3, max_tokens=14, packing=True)
    assert [mb.index.tolist() for mb in packed] == [[1], [3, 0, 2]]
    assert all(mb.packed and mb.input_ids.shape[0] == 1 for mb in packed)
    assert [mb.model_tokens for mb in packed] == [12, 14]
    padded = plan_micro_batches(batch, micro_batch=3, max_tokens=14, packing=False)
    assert [mb.index.tolist() for mb in padded] == [[1], [3, 0], [2]]
    assert [mb.model_tokens for mb in padded] == [12, 12, 3]
    # every sequence appears exactly once, whatever the plan
    for plan in (fixed, packed, padded):
        assert sorted(i for mb in plan for i in mb.index.tolist()) == [0, 1, 2, 3]


def test_packed_row_layout_maps_back_to_sequences() -> None:
    batch = collate(_groups([(2, 3), (0, 4), (3, 1)]), pad_id=0)
    mb = packed_micro_batch(batch)
    lens = [5, 4, 4]
    assert mb.seq_lens == lens
    assert mb.input_ids[0].tolist() == [0, 1, 50, 51, 52, 150, 151, 152, 153, 200, 201, 202, 250]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3]
    # the scored position of (sequence, column) predicts the same token in both layouts
    rows = mb.input_ids.reshape(-1)
    nxt = batch.input_ids[:, 1:].reshape(-1)
    assert rows[mb.src + 1].tolist() == nxt[mb.dst].tolist() == mb.targets().tolist()
    # completion tokens only: an empty prompt's first token has no predicting position
    assert mb.targets().tolist() == [50, 51, 52, 151, 152, 153, 250]
    pad = padded_micro_batch(batch)
    assert pad.input_ids.reshape(-1)[pad.src + 1].tolist() == mb.targets().tolist()
    assert pad.dst.tolist() == mb.dst.tolist()


def test_sequence_fields_follow_the_selection() -> None:
    rng = random.Random(0)
    batch = collate(_groups([(rng.randint(1, 4), rng.randint(1, 6)) for _ in range(7)]), pad_id=0)
    for mb in plan_micro_batches(batch, micro_batch=2, max_tokens=9, packing=True):
        sub = mb.batch
        assert sub.group_index.tolist() == mb.index.tolist()
        assert sub.mask.shape[1] == int(sub.lengths.max()) - 1  # trimmed to its longest row
        full = batch.advantages[mb.index]
        assert torch.equal(sub.advantages, full[:, :sub.mask.shape[1]])
        assert sub.num_tokens == int(batch.mask[mb.index].sum())


def _shared_groups() -> list[TrajectoryGroup]:
    """Group 0: prompt [1, 2, 3] with completions of 2, 1 and 3 tokens; group 1: prompt [4]
    with one completion; group 2: an empty prompt with two completions."""
    out = []
    for g, (prompt, comps) in enumerate([([1, 2, 3], [[10, 11], [20], [30, 31, 32]]),
                                         ([4], [[40, 41]]), ([], [[50, 51], [60]])]):
        group = TrajectoryGroup(group_id=f"g{g}", prompt_ids=prompt)
        for c in comps:
            group.samples.add(completion_ids=c, advantage=1.0)
        out.append(group)
    return out


def test_shared_prompt_row_layout_maps_back_to_sequences() -> None:
    batch = collate(_shared_groups(), pad_id=0)
    mb = shared_micro_batch(batch)
    # group 0's prompt once, then its completions; an empty prompt cannot be shared
    assert mb.input_ids[0].tolist() == [1, 2, 3, 10, 11, 20, 30, 31, 32, 4, 40, 41, 50, 51, 60]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 2, 0, 1, 0]
    assert mb.seq_lens == [9, 3, 2, 1] and mb.branches == [(3, 2, 1, 3), (), (), ()]
    assert mb.model_tokens == mb.real_tokens == 15
    assert int(batch.lengths.sum()) == 21  # unshared: group 0's prompt three times
    rows = mb.input_ids.reshape(-1)
    # the scored position of (sequence, column) predicts the same token in both layouts; all
    # three completions of group 0 are predicted from the prompt's last position first
    assert rows[mb.src[:3]].tolist() == [3, 10, 3]
    assert mb.targets().tolist() == [10, 11, 20, 30, 31, 32, 40, 41, 51]
    pad = padded_micro_batch(batch)
    assert pad.input_ids.reshape(-1)[pad.src + 1].tolist() == mb.targets().tolist()
    assert pad.dst.tolist() == mb.dst.tolist()


def test_shared_bins_keep_groups_whole_within_the_budget() -> None:
    batch = collate(_shared_groups(), pad_id=0)
    # costs: group 0 = 3 + 6 = 9, group 1 = 3, the two empty-prompt rows 2 and 1; first fit
    # decreasing: 9 + 1 | 3 + 2
    assert shared_bins(batch, 10) == [[0, 1, 2, 5], [3, 4]]
    # a budget of 6 splits group 0 into pieces that each carry the prompt: 3+2+1 | 3+3
    bins = shared_bins(batch, 6)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert [0, 1] in bins and [2] in bins
    plan = plan_micro_batches(batch, micro_batch=4, max_tokens=10, packing=True,
                              share_prompts=True)
    assert [mb.model_tokens for mb in plan] == [10, 5]
    assert all(mb.model_tokens <= 10 for mb in plan)
