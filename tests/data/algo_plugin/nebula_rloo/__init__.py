"""Nebula plug-ins: RLOO (Ahmadian et al. 2024), each sample's advantage its reward minus the
mean reward of the other samples of its prompt, with GRPO's clipped surrogate; and a
two-turn environment that asks the model to look at its answer again."""

from __future__ import annotations

from typing import Any, Literal, Sequence

from nebula.algo.grpo import GRPO
from nebula.env import Environment, StepResult
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


class SecondLook(Environment):
    """After the model's first answer the environment says "again:" and the model answers a
    second time; the verifier scores the second answer."""

    name = "second-look"

    async def reset(self, row: Any) -> None:
        self.turns = 0

    async def step(self, message: str) -> StepResult:
        self.turns += 1
        if self.turns >= 2:
            return StepResult(done=True, reward_parts={"answered_twice": 0.0})
        return StepResult(observation="again:", done=False)
