"""OPD with the teacher's top-k distribution (stage top_k > 0): the loss on a hand-made case,
its gradient, the record and the collated tensors."""

from __future__ import annotations

import math

import pytest
import torch

from learner.batch import collate, token_logprobs
from nebula.losses.distill import topk_distill_loss
from rollout.distill import TeacherScore
from nebula.algo.opd import OPD, OPDStage
from rollout.groups import build_group
from nebula.prompts import PromptRow
from test_opd import _sample, _verdict  # the fake engine sample / verdict of the OPD tests


def test_loss_hand_made_case() -> None:
    # Teacher top-2 log-probs (log .6, log .2) renormalise to q = (.75, .25); the student gives
    # those tokens .5 and .25.
    teacher = torch.tensor([[[math.log(0.6), math.log(0.2)], [-math.inf, -math.inf]]])
    student = torch.tensor([[[math.log(0.5), math.log(0.25)], [0.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])  # the second position has no top-k: left out, no NaN
    loss, m = topk_distill_loss(student, teacher, mask)
    assert loss.item() == pytest.approx(-(0.75 * math.log(0.5) + 0.25 * math.log(0.25)))
    assert m["distill_kl"] == pytest.approx(0.75 * math.log(0.75 / 0.5))
    assert m["distill_student_mass"] == pytest.approx(0.75)
    loss.backward()
    # dL/dlog p_student(v_i) = -q_i on the trained position, 0 elsewhere
    assert student.grad[0, 0].tolist() == pytest.approx([-0.75, -0.25])
    assert student.grad[0, 1].tolist() == [0.0, 0.0]
    # normalised by the optimizer batch's token count when given
    half, _ = topk_distill_loss(student.detach(), teacher, mask, num_tokens=2)
    assert half.item() == pytest.approx(loss.item() / 2)


def test_gradient_steps_move_the_student_to_the_teacher_distribution() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 6, requires_grad=True)
    target = torch.log_softmax(torch.randn(1, 3, 6) * 3, -1)
    top_lp, top_ids = target.topk(6, dim=-1)  # k = vocab: the exact forward KL
    mask = torch.ones(1, 3)
    opt = torch.optim.SGD([logits], lr=1.0)
    kls = []
    for _ in range(60):
        student = torch.log_softmax(logits, -1).gather(-1, top_ids)
        loss, m = topk_distill_loss(student, top_lp, mask)
        kls.append(m["distill_kl"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kls[-1] < 0.05 * kls[0]


def test_record_and_batch_carry_the_teacher_top_k() -> None:
    row = PromptRow(index=0, prompt_ids=[5, 6], prompt_text="ab", reference="1",
                    verifier="exact", metadata={}, domain="add")
    samples = [_sample([7, 8], [-1.0, -2.0]), _sample([9], [-0.1])]
    scores = [TeacherScore("t", "v1", [-0.5, -2.5], [[7, 3], [4, 8]], [[-0.5, -1.0], [-0.2, -2.5]]),
              TeacherScore("t", "v1", [-1.1], [[2, 9]], [[-0.4, -1.1]])]
    g = build_group(job_id="j", stage="opd0", row=row, samples=samples,
                    verdicts=[_verdict(1.0), _verdict(0.0)], version=3, ticket=0, step=0,
                    worker="w", teacher=scores,
                    algo=OPD(OPDStage(teacher="t", alpha=0.5, baseline="group", top_k=2)))
    s0, s1 = g.samples
    assert s0.teacher_top_k == 2 and list(s0.teacher_top_ids) == [7, 3, 4, 8]
    assert list(s1.teacher_top_logprobs) == pytest.approx([-0.4, -1.1])
    # the per-token advantage is the outcome part only (alpha * +-1); no log-ratio, no baseline
    assert list(s0.token_advantages) == pytest.approx([0.5, 0.5], abs=1e-5)
    assert list(s1.token_advantages) == pytest.approx([-0.5], abs=1e-5)
    batch = collate([g], pad_id=0)
    # completion token j of a prompt of length 2 is predicted at column 1 + j
    assert batch.teacher_top_ids.shape == (2, 3, 2)
    assert batch.teacher_top_ids[0, 1:3].tolist() == [[7, 3], [4, 8]]
    assert batch.teacher_top_ids[1, 1].tolist() == [2, 9]
    assert batch.has_top[0].tolist() == [False, True, True]
    assert batch.has_top[1].tolist() == [False, True, False]
    assert batch.teacher_top_logprobs[1, 1].tolist() == pytest.approx([-0.4, -1.1])
    # micro-batches keep the top-k aligned with the columns they slice
    mb = batch.micro_batches(1)[1]
    assert mb.teacher_top_ids.shape[:2] == mb.mask.shape
    # the learner's gathered log-probs are its own log-probs at those ids
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=12, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         intermediate_size=32, max_position_embeddings=16)).eval()
    lp, top = token_logprobs(model, batch, with_top=True)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=batch.input_ids).logits[:, :-1].float(), -1)
    assert top[0, 1].tolist() == pytest.approx(full[0, 1, [7, 3]].tolist(), abs=1e-5)
    assert lp.shape == batch.mask.shape


def test_wrongly_shaped_top_k_is_refused() -> None:
    row = PromptRow(index=0, prompt_ids=[5], prompt_text="a", reference="1", verifier="exact",
                    metadata={}, domain="add")
    with pytest.raises(ValueError, match="top-k rows of the wrong shape"):
        build_group(job_id="j", stage="opd0", row=row, samples=[_sample([7, 8], [-1.0, -2.0])],
                    verdicts=[_verdict(1.0)], version=0, ticket=0, step=0, worker="w",
                    teacher=[TeacherScore("t", "v", [-0.5, -2.5], [[7, 3]], [[-0.5, -1.0]])],
                    algo=OPD(OPDStage(teacher="t", top_k=2)))
