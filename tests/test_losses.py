"""Losses (GRPO, KL, SFT), group advantages and batch collation, against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from learner.batch import Batch, collate, collate_sft, token_logprobs
from nebula.losses import (group_advantages, grpo_loss, kl_estimate, kl_k1, kl_k3, sft_loss,
                            sft_loss_from_logits)
from nebula.v1.trajectory_pb2 import TrajectoryGroup

CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # ratio clip range [0.8, 1.28]


def _case() -> dict[str, torch.Tensor]:
    """2 sequences x 3 tokens with ratios r = exp(logp - old) chosen to hit both clip sides.

    seq 0, A = +1, mask [1, 1, 1]:
      t0: r = 1.0 -> min(1.0, 1.0) = 1.0;  pg = -1.0,  d pg / d logp = -A r = -1.0
      t1: r = 1.5 -> clip 1.28, min(1.5, 1.28) = 1.28 (clipped, high side);  pg = -1.28, grad 0
      t2: r = 0.5 -> clip 0.8, min(0.5, 0.8) = 0.5 (unclipped);  pg = -0.5,  grad -A r = -0.5
    seq 1, A = -2, mask [1, 1, 0]:
      t0: r = 0.5 -> clip 0.8: min(-1.0, -1.6) = -1.6 (clipped, low side);  pg = 1.6, grad 0
      t1: r = 1.5 -> clip 1.28: min(-3.0, -2.56) = -3.0 (unclipped);  pg = 3.0, grad -A r = 3.0
      t2: masked (r = 2.0 would be clipped; must not count)
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=torch.float64)
    ratio = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 2.0]], dtype=torch.float64)
    logp = (old + ratio.log()).clone().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    return {"logp": logp, "old": old, "adv": adv, "mask": mask}


def test_grpo_token_norm_loss_and_grad() -> None:
    c = _case()
    loss, m = grpo_loss(c["logp"], c["old"], None, c["adv"], c["mask"], CLIP_LOW, CLIP_HIGH,
                        "token", is_cap=None)
    # token norm: N = 5 masked tokens; sum pg = -1 - 1.28 - 0.5 + 1.6 + 3.0 = 1.82
    assert loss.item() == pytest.approx(1.82 / 5, abs=1e-12)
    loss.backward()
    # d L / d logp = (d pg / d logp) / N
    expected = torch.tensor([[-1.0, 0.0, -0.5], [0.0, 3.0, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(c["logp"].grad, expected)
    assert m["clip_frac"] == pytest.approx(2 / 5)
    assert m["clip_frac_low"] == pytest.approx(1 / 5)
    assert m["clip_frac_high"] == pytest.approx(1 / 5)
    assert m["ratio_mean"] == pytest.approx((1.0 + 1.5 + 0.5 + 0.5 + 1.5) / 5)
    assert m["is_weight_mean"] == 1.0 and m["is_truncated_frac"] == 0.0
    assert m["tokens"] == 5 and m["sequences"] == 2 and m["kl"] == 0.0


def test_grpo_sequence_norm_loss_and_grad() -> None:
    c = _case()
    loss, _ = grpo_loss(c["logp"], c["old"], None, c["adv"], c["mask"], CLIP_LOW, CLIP_HIGH,
                        "sequence", is_cap=None)
    # seq 0 mean: (-1 - 1.28 - 0.5) / 3 = -0.92667; seq 1 mean: (1.6 + 3.0) / 2 = 2.3
    # L = (-2.78 / 3 + 2.3) / 2 = 0.686667
    assert loss.item() == pytest.approx((-2.78 / 3 + 2.3) / 2, abs=1e-12)
    loss.backward()
    # d L / d logp = (d pg / d logp) / (n_b * S), S = 2 sequences: seq 0 / 6, seq 1 / 4
    expected = torch.tensor([[-1.0 / 6, 0.0, -0.5 / 6], [0.0, 3.0 / 4, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(c["logp"].grad, expected)


def test_grpo_global_normalisers_for_micro_batches() -> None:
    """Splitting the batch and passing the batch's token/sequence counts sums to the whole."""
    for norm in ("token", "sequence"):
        c = _case()
        full, _ = grpo_loss(c["logp"], c["old"], None, c["adv"], c["mask"], CLIP_LOW,
                            CLIP_HIGH, norm)
        parts = [grpo_loss(c["logp"][i:i + 1], c["old"][i:i + 1], None, c["adv"][i:i + 1],
                           c["mask"][i:i + 1], CLIP_LOW, CLIP_HIGH, norm,
                           num_tokens=5, num_sequences=2)[0] for i in range(2)]
        assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-12)


def test_is_correction_weights_and_truncation() -> None:
    # ratio 1 (logp == old), A = +1 everywhere, so pg = -1 per token and d pg/d logp = -1.
    old = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    logp = old.clone().requires_grad_(True)
    adv = torch.ones_like(old)
    mask = torch.ones_like(old)
    # w = exp(old - beh): 1.5, 3.0 -> capped at 2.0, 1.0
    beh = old - torch.log(torch.tensor([[1.5, 3.0, 1.0]], dtype=torch.float64))
    loss, m = grpo_loss(logp, old, beh, adv, mask, CLIP_LOW, CLIP_HIGH, "token", is_cap=2.0)
    # L = sum_t w_t * (-1) / 3 = -(1.5 + 2.0 + 1.0) / 3 = -1.5
    assert loss.item() == pytest.approx(-1.5, abs=1e-12)
    loss.backward()
    # weights are detached: d L / d logp = -w r / N
    torch.testing.assert_close(logp.grad, -torch.tensor([[1.5, 2.0, 1.0]],
                                                        dtype=torch.float64) / 3)
    assert m["is_weight_mean"] == pytest.approx(4.5 / 3)
    assert m["is_truncated_frac"] == pytest.approx(1 / 3)


def test_is_correction_no_effect_when_behaviour_is_old() -> None:
    c = _case()
    base, _ = grpo_loss(c["logp"], c["old"], None, c["adv"], c["mask"], CLIP_LOW, CLIP_HIGH,
                        "token", is_cap=None)
    (g_base,) = torch.autograd.grad(base, c["logp"])
    same, m = grpo_loss(c["logp"], c["old"], c["old"].clone(), c["adv"], c["mask"], CLIP_LOW,
                        CLIP_HIGH, "token", is_cap=2.0)
    (g_same,) = torch.autograd.grad(same, c["logp"])
    assert same.item() == base.item()
    torch.testing.assert_close(g_same, g_base)
    assert m["is_weight_mean"] == 1.0 and m["is_truncated_frac"] == 0.0
    # is_cap None ignores a different behaviour policy entirely
    off, _ = grpo_loss(c["logp"], c["old"], c["old"] - 5.0, c["adv"], c["mask"], CLIP_LOW,
                       CLIP_HIGH, "token", is_cap=None)
    assert off.item() == base.item()


def test_kl_estimators() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.3], dtype=torch.float64)
    ref = torch.tensor([-2.0, -1.0, -0.3], dtype=torch.float64)
    # k1 = logp - ref
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([1.0, -1.0, 0.0],
                                                              dtype=torch.float64))
    # k3 = exp(d) - d - 1, d = ref - logp: d = -1 -> e^-1 = 0.367879; d = 1 -> e - 2 = 0.718282
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor(
        [math.exp(-1.0), math.e - 2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), kl_k1(logp, ref))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), kl_k3(logp, ref))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")  # type: ignore[arg-type]


def test_grpo_kl_penalty_value_and_grad() -> None:
    # A = 0 -> only the KL term: L = coef * mean k3, d/dlogp = coef * (1 - exp(ref - logp)) / N
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0]], dtype=torch.float64)
    zeros = torch.zeros_like(ref)
    loss, m = grpo_loss(logp, logp.detach(), None, zeros, torch.ones_like(ref), CLIP_LOW,
                        CLIP_HIGH, "token", None, ref_logprobs=ref, kl_coef=0.1,
                        kl_estimator="k3")
    k3 = [math.exp(-1.0), math.e - 2.0]
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, abs=1e-12)
    assert m["kl"] == pytest.approx(sum(k3) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, 0.1 * torch.tensor(
        [[1 - math.exp(-1.0), 1 - math.e]], dtype=torch.float64) / 2)


def test_sft_loss_mask() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    # mean NLL over the 3 masked tokens: (2 + 3 + 4) / 3
    assert sft_loss(logprobs, mask).item() == pytest.approx(3.0)
    assert sft_loss(logprobs, mask, num_tokens=6).item() == pytest.approx(1.5)
    # from logits: same as cross-entropy with the unmasked targets ignored
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    ids = torch.randint(0, 7, (2, 4))
    m = torch.tensor([[0, 1, 1], [1, 1, 0]])
    labels = ids[:, 1:].masked_fill(m == 0, -100)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels.reshape(-1),
                                            ignore_index=-100)
    assert sft_loss_from_logits(logits, ids, m).item() == pytest.approx(ref.item(), abs=1e-6)


def test_group_advantages() -> None:
    # mean 0.5, population std 0.5
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert adv == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    # mean 0.25, std sqrt(0.1875) = 0.4330127
    std = math.sqrt(0.1875)
    assert group_advantages([0, 0, 0, 1]) == pytest.approx(
        [-0.25 / std, -0.25 / std, -0.25 / std, 0.75 / std], abs=1e-5)
    assert group_advantages([0.7, 0.7, 0.7]) == [0.0, 0.0, 0.0]
    assert group_advantages([]) == []
    assert group_advantages([1, 0], scale="none") == pytest.approx([0.5, -0.5])
    assert sum(group_advantages([0.1, 0.9, 0.3, 0.3, 1.0])) == pytest.approx(0.0, abs=1e-9)


def _group() -> TrajectoryGroup:
    g = TrajectoryGroup(group_id="g", prompt_ids=[11, 12, 13])
    g.samples.add(completion_ids=[21, 22], behaviour_logprobs=[-0.1, -0.2],
                  policy_versions=[4, 5], advantage=0.5, reward=1.0)
    g.samples.add(completion_ids=[31, 32, 33, 34], behaviour_logprobs=[-1, -2, -3, -4],
                  policy_versions=[5, 5, 5, 5], loss_mask=[1, 0, 1, 1], advantage=-0.5,
                  token_advantages=[0.1, 0.2, 0.3, 0.4], teacher_logprobs=[-9, -8, -7, -6])
    return g


def test_collate_alignment() -> None:
    b = collate([_group()], pad_id=0)
    # L = 3 + 4 = 7 columns of ids, T = 6 predicting positions
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22, 0, 0], [11, 12, 13, 31, 32, 33, 34]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    # column t predicts input token t + 1: completion token j sits at P + j, predicted at P+j-1
    assert b.completion_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert b.mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1]]  # loss_mask [1,0,1,1]
    nxt = b.input_ids[:, 1:]
    assert nxt[b.completion_mask > 0].tolist() == [21, 22, 31, 32, 33, 34]
    assert nxt[b.mask > 0].tolist() == [21, 22, 31, 33, 34]
    torch.testing.assert_close(b.advantages, torch.tensor(
        [[0, 0, 0.5, 0.5, 0, 0], [0, 0, 0.1, 0.2, 0.3, 0.4]]))
    torch.testing.assert_close(b.behaviour_logprobs, torch.tensor(
        [[0, 0, -0.1, -0.2, 0, 0], [0, 0, -1, -2, -3, -4.0]]))
    assert b.has_behaviour.tolist() == (b.completion_mask > 0).tolist()
    assert b.policy_versions.tolist() == [[-1, -1, 4, 5, -1, -1], [-1, -1, 5, 5, 5, 5]]
    assert b.has_teacher[1].tolist() == [False, False, True, True, True, True]
    assert not b.has_teacher[0].any()
    assert b.num_tokens == 5 and b.num_sequences == 2
    assert b.prompt_lens.tolist() == [3, 3] and b.completion_lens.tolist() == [2, 4]

    # micro-batches trim padding beyond their longest row and keep alignment
    first = b.slice(0, 1)
    assert first.input_ids.shape == (1, 5) and first.mask.shape == (1, 4)
    assert first.input_ids[:, 1:][first.mask > 0].tolist() == [21, 22]
    assert [mb.size for mb in b.micro_batches(1)] == [1, 1]


def test_logprob_mismatch_metrics() -> None:
    """|old - beh| and k3 = exp(d) - d - 1 over tokens with behaviour log-probs, and over the
    fresh ones (policy version == the learner's)."""
    from learner.mismatch import LogprobMismatch

    b = collate([_group()], pad_id=0)
    d_rows = [[0.1, -0.2], [0.0, 0.3, 0.0, -0.1]]  # old - beh per completion token
    old = b.behaviour_logprobs.clone()
    old[0, 2:4] += torch.tensor(d_rows[0])
    old[1, 2:6] += torch.tensor(d_rows[1])
    old[0, 0] = 9.0  # a prompt position: no behaviour log-prob, left out
    acc = LogprobMismatch()
    acc.add(old, b, version=5)  # sample 0's first token is version 4: stale
    m = acc.metrics()
    d_all = d_rows[0] + d_rows[1]
    d_fresh = d_rows[0][1:] + d_rows[1]

    def k3(ds: list[float]) -> float:
        return sum(math.exp(x) - x - 1 for x in ds) / len(ds)

    assert m["mismatch_tokens"] == 6 and m["mismatch_fresh_tokens"] == 5
    assert m["logprob_diff_abs_mean"] == pytest.approx(0.7 / 6, abs=1e-6)
    assert m["logprob_diff_abs_max"] == pytest.approx(0.3, abs=1e-6)
    assert m["mismatch_kl_k3"] == pytest.approx(k3(d_all), abs=1e-7)
    assert m["logprob_diff_abs_mean_fresh"] == pytest.approx(0.6 / 5, abs=1e-6)
    assert m["mismatch_kl_k3_fresh"] == pytest.approx(k3(d_fresh), abs=1e-7)
    acc.add(old, b, version=5)  # sums over micro-batches: the means stay
    assert acc.metrics()["mismatch_kl_k3"] == pytest.approx(k3(d_all), abs=1e-7)
    assert acc.metrics()["mismatch_tokens"] == 12


def test_collate_rejects_length_mismatch_and_sft_pairs() -> None:
    g = TrajectoryGroup(prompt_ids=[1, 2])
    g.samples.add(completion_ids=[3, 4], loss_mask=[1])
    with pytest.raises(ValueError):
        collate([g], pad_id=0)
    b = collate_sft([([1, 2], [3, 4, 5]), ([], [6, 7])], pad_id=0)
    # an empty prompt: the first target token has no predicting position
    assert b.mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    assert b.input_ids[:, 1:][b.mask > 0].tolist() == [3, 4, 5, 7]


def test_token_logprobs_gathers_next_tokens() -> None:
    """log_softmax(logits / T) of the next token at the completion positions, 0 elsewhere
    (chunked; tests/test_logprobs.py compares gradients, top-k and packing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=32, max_position_embeddings=16))
    b: Batch = collate([_group()], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    for temp in (1.0, 0.7):
        lp = token_logprobs(model, b, temperature=temp)
        assert lp.shape == (2, 6)
        table = torch.log_softmax(logits[:, :-1] / temp, dim=-1)
        for row in range(2):
            ids = b.input_ids[row].tolist()
            for t in range(6):
                want = table[row, t, ids[t + 1]].item() if b.completion_mask[row, t] else 0.0
                assert lp[row, t].item() == pytest.approx(want, abs=1e-5)


def test_cosine_lr_schedules() -> None:
    """SFT: 5% linear warm-up, then cosine to 10%; RL `lr_schedule: cosine`: no warm-up."""
    from learner.lr_schedule import cosine_lr

    sft = [cosine_lr(1.0, s, 100) for s in range(100)]
    assert sft[0] == pytest.approx(0.2) and sft[4] == pytest.approx(1.0)  # warm-up 5 steps
    assert all(a >= b for a, b in zip(sft[4:], sft[5:]))  # then only down
    assert sft[-1] == pytest.approx(0.1, abs=0.01)
    rl = [cosine_lr(1e-3, s, 10, warmup_frac=0.0) for s in range(10)]
    assert rl[0] == pytest.approx(1e-3) and rl[5] == pytest.approx(0.55e-3)
    assert rl[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9))))
