"""No-grad scoring with `DSLearnerEngine`'s current policy: the log-prob of every completion
token of trajectory groups (evaluation, tests) and summed target log-probs of (prompt, target)
sequences (DPO's reference log-probs, held-out preference accuracy).

A mixin: it uses the engine's `engine` (DeepSpeed), `pad_id`, `device`, `micro_batches` and
`_no_grad_logprobs`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from nebula.v1.trajectory_pb2 import TrajectoryGroup


class EngineScoring:
    engine: Any
    pad_id: int
    device: Any
    micro_batches: Any
    _no_grad_logprobs: Any

    def sequence_logprobs(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]
                          ) -> list[float]:
        """Current policy's summed log-prob (temperature 1) of each (prompt, target)'s target
        tokens, without gradient (e.g. DPO's reference log-probs)."""
        from learner.batch import collate_sft

        out = [0.0] * len(sequences)
        for i in range(0, len(sequences), 256):
            batch = collate_sft(sequences[i:i + 256], self.pad_id, self.device)
            for mb in self.micro_batches(batch):
                lp = self._no_grad_logprobs(self.engine, [mb], temperature=1.0)[0].token
                sums = (lp * mb.batch.mask).sum(-1).float().cpu().tolist()
                for row, b in enumerate(mb.index.tolist()):
                    out[i + b] = sums[row]
        return out

    def logprobs(self, groups: Sequence[TrajectoryGroup]) -> list[list[float]]:
        """Current-policy log-prob of every completion token, one list per sample (groups in
        order, their samples in order). A sample with an empty prompt has no log-prob for
        its first completion token."""
        from learner.batch import collate

        batch = collate(groups, self.pad_id, self.device)
        out: list[list[float]] = [[] for _ in range(batch.size)]
        for mb in self.micro_batches(batch):
            lp = self._no_grad_logprobs(self.engine, [mb])[0].token.float().cpu()
            cm = mb.batch.completion_mask.cpu() > 0
            for row, b in enumerate(mb.index.tolist()):
                out[b] = lp[row][cm[row]].tolist()
        return out
