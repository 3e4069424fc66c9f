"""What an environment is: the other side of a (multi-turn) rollout.

An episode is one instance: `reset(row)` before the first turn (the row's formatted prompt is
the first observation), then `step(message)` after every assistant turn with that turn's text,
answering an observation (a tool's result, ...) or ending the episode. The verifier service
scores the episode's last assistant turn as before; an environment may add reward terms
(`reward_parts`). A turn the environment cannot read ends the episode with `error`: the sample
is recorded as failed and never trained as if valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from nebula.config.env import EnvironmentConfig


# policy_versions value of an observation token in a trajectory record (proto: Sample).
OBSERVATION_VERSION = -2


@dataclass
class StepResult:
    observation: str | None = None  # what the environment answers; None when done
    done: bool = True
    reward_parts: dict[str, float] = field(default_factory=dict)
    error: str | None = None        # the turn could not be read: the episode failed
    tool_call: bool = False         # this turn called a tool


class Environment:
    """Base: the single-turn episode (the model answers once)."""

    name: ClassVar[str]
    multi_turn: ClassVar[bool] = True

    def __init__(self, cfg: EnvironmentConfig) -> None:
        self.cfg = cfg

    def stop_strings(self) -> list[str]:
        """Strings that end an assistant turn besides EOS (e.g. a tool call's closing tag)."""
        return []

    async def reset(self, row: Any) -> None:
        """Start an episode on a prompt row (`nebula.prompts.PromptRow`)."""

    async def step(self, message: str) -> StepResult:
        return StepResult()
