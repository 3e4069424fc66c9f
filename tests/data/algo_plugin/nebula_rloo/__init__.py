"""RLOO (Ahmadian et al. 2024) as a Nebula plug-in: each sample's advantage is its reward minus
the mean reward of the other samples of its prompt; the loss is GRPO's clipped surrogate."""

from __future__ import annotations

from typing import Any, Literal, Sequence

from nebula.algo.grpo import GRPO
from nebula.config.stage import StageConfig


class RLOOStage(StageConfig):
    type: Literal["rloo"] = "rloo"


class RLOO(GRPO):
    Config = RLOOStage

    def advantages(self, rewards: list[float], scored: list[bool], samples: Sequence[Any],
                   teacher: Sequence[Any] | None) -> list[tuple[float, list[float]]]:
        kept = [r for r, ok in zip(rewards, scored) if ok]
        n, total = len(kept), sum(kept)
        return [((r - (total - r) / (n - 1)) if ok and n > 1 else 0.0, [])
                for r, ok in zip(rewards, scored)]
