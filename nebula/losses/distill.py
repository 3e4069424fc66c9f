"""Top-k distribution distillation on the student's own samples (OPD/MOPD with top_k > 0).

At every completion position t of a student sample the teacher returned its top-k tokens
v_1..v_k with log-probs. The teacher's distribution is renormalised over those k tokens,
q_t(v_i) = softmax_i(log pi_teacher(v_i)), and the student is trained on the cross-entropy

    l_t = - sum_i q_t(v_i) * log pi_student(v_i)

i.e. the forward KL KL(q_t || pi_student) up to the teacher's (constant) entropy. The prefixes
are the student's own samples, so this is on-policy distillation with the teacher's whole
top-k distribution as the target instead of one sampled token's log-ratio: every position
carries a full supervised signal. The loss is the token mean over positions with a top-k,
normalised by `num_tokens` of the whole optimizer batch so micro-batch losses add up.
"""

from __future__ import annotations

import torch


def topk_distill_loss(student_top: torch.Tensor, teacher_top: torch.Tensor, mask: torch.Tensor,
                      *, num_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """student_top / teacher_top: [B, T, k] log-probs of the teacher's top-k ids under the
    student (with gradient) and the teacher; mask: [B, T], 1 where the position is trained
    and has a top-k. Returns the loss and metrics: distill_kl (mean KL(q || pi_student) over
    the trained positions, >= 0) and distill_student_mass (the student's mean probability
    mass on the teacher's top-k)."""
    valid = mask > 0
    n = float(num_tokens) if num_tokens is not None else float(valid.sum())
    # Positions without a top-k hold -inf padding: give them a finite row before the softmax.
    safe_t = torch.where(valid.unsqueeze(-1), teacher_top, torch.zeros_like(teacher_top))
    safe_s = torch.where(valid.unsqueeze(-1), student_top, torch.zeros_like(student_top))
    log_q = torch.log_softmax(safe_t.float(), dim=-1)
    q = log_q.exp()
    ce = -(q * safe_s).sum(-1)
    m = mask.to(ce.dtype)
    loss = (ce * m).sum() / max(n, 1.0)
    with torch.no_grad():
        kl = (q * (log_q - safe_s)).sum(-1)
        cnt = float(m.sum())
        mass = safe_s.exp().sum(-1)
        metrics = {"distill_kl": float((kl * m).sum() / cnt) if cnt else 0.0,
                   "distill_student_mass": float((mass * m).sum() / cnt) if cnt else 0.0}
    return loss, metrics
