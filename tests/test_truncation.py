"""Truncated completions (cut by max_tokens): marked in the record, and rollout.truncated
decides whether they are trained (keep), left out of the loss (mask) or re-rewarded
(penalty); the learner batch follows the record's loss mask. Samples the verifier could not
score (error, timeout) are not trained as wrong answers."""

from __future__ import annotations

import pytest

from learner.batch import collate
from nebula.prompts import PromptRow
from rollout.engine import SampleOut
from nebula.algo.grpo import GRPO, GRPOStage
from rollout.groups import build_group
from nebula.clients.verifier import ItemResult

ROW = PromptRow(index=0, prompt_text="q", prompt_ids=[5, 6, 7], reference="a", verifier="exact")


def _group(policy: str, reward: float = 0.0):
    samples = [SampleOut([1, 2, 3], [-0.1, -0.2, -0.3], "ok", "stop"),
               SampleOut([4, 5, 6, 7], [-0.5] * 4, "long", "length"),
               SampleOut([8, 9], [-0.4, -0.1], "no", "stop")]
    verdicts = [ItemResult(id=str(i), verifier="exact", status="ok", reward=r, passed=r > 0)
                for i, r in enumerate([1.0, 1.0, 0.0])]
    return build_group(job_id="j", stage="grpo0", row=ROW, samples=samples, verdicts=verdicts,
                       version=3, ticket=0, step=0, worker="w", algo=GRPO(GRPOStage()),
                       truncated=policy,
                       truncated_reward=reward)


def test_truncated_is_marked_and_kept_by_default() -> None:
    g = _group("keep")
    assert [s.truncated for s in g.samples] == [False, True, False]
    assert [s.finish_reason for s in g.samples] == ["stop", "length", "stop"]
    assert [s.reward for s in g.samples] == [1.0, 1.0, 0.0]
    assert all(list(s.loss_mask) == [1] * len(s.completion_ids) for s in g.samples)


def test_mask_leaves_truncated_out_of_the_loss_but_in_the_group_statistics() -> None:
    keep, mask = _group("keep"), _group("mask")
    assert list(mask.samples[1].loss_mask) == [0, 0, 0, 0]
    # Same rewards, same group-normalised advantages: only the loss mask differs.
    assert [s.advantage for s in mask.samples] == [s.advantage for s in keep.samples]
    batch = collate([mask], pad_id=0)
    assert batch.mask[1].sum() == 0 and batch.mask[0].sum() == 3 and batch.mask[2].sum() == 2
    assert batch.num_tokens == 5


def test_penalty_replaces_the_reward_of_truncated_samples() -> None:
    g = _group("penalty", reward=-1.0)
    assert [s.reward for s in g.samples] == [1.0, -1.0, 0.0]
    assert g.samples[1].advantage < g.samples[2].advantage < g.samples[0].advantage
    assert list(g.samples[1].loss_mask) == [1, 1, 1, 1]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="rollout.truncated"):
        _group("drop")


def test_unscored_samples_are_left_out_of_the_loss_and_the_group_statistics() -> None:
    samples = [SampleOut([1, 2], [-0.1, -0.2], "a", "stop"),
               SampleOut([3, 4], [-0.1, -0.2], "b", "stop"),
               SampleOut([5, 6], [-0.1, -0.2], "c", "stop")]
    verdicts = [ItemResult(id="0", verifier="math", status="ok", reward=1.0, passed=True),
                ItemResult(id="1", verifier="math", status="timeout", reward=0.0),
                ItemResult(id="2", verifier="math", status="ok", reward=0.0)]
    g = build_group(job_id="j", stage="grpo0", row=ROW, samples=samples, verdicts=verdicts,
                    version=0, ticket=0, step=0, worker="w", algo=GRPO(GRPOStage()))
    # The two scored samples are normalised between themselves (+1, -1); the timed-out one
    # gets no advantage and no loss, where a 0 reward would have made it a wrong answer.
    assert [round(s.advantage, 4) for s in g.samples] == [1.0, 0.0, -1.0]
    assert [list(s.loss_mask) for s in g.samples] == [[1, 1], [0, 0], [1, 1]]
    assert g.samples[1].verify.status == 3  # timeout, kept in the record


def test_soft_overlong_punishment() -> None:
    """DAPO: with max_tokens 4 and a buffer of 2, a 3-token completion loses half the
    penalty, a 4-token one all of it, a shorter one nothing."""
    samples = [SampleOut([1, 2], [-0.1] * 2, "a", "stop"),
               SampleOut([1, 2, 3], [-0.1] * 3, "b", "stop"),
               SampleOut([1, 2, 3, 4], [-0.1] * 4, "c", "length")]
    verdicts = [ItemResult(id=str(i), verifier="exact", status="ok", reward=1.0, passed=True)
                for i in range(3)]
    g = build_group(job_id="j", stage="grpo0", row=ROW, samples=samples, verdicts=verdicts,
                    version=0, ticket=0, step=0, worker="w", algo=GRPO(GRPOStage()),
                    max_tokens=4, overlong_buffer=2, overlong_penalty=0.5)
    assert [s.reward for s in g.samples] == pytest.approx([1.0, 0.75, 0.5])
