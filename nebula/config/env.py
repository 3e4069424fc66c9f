"""Config of the rollout's environment (`rollout.environment`): what answers the model
between its turns."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from nebula.config.verifier import SandboxConfig, Strict


class EnvironmentConfig(Strict):
    name: str = Field("single_turn", description="Registered environment (`nebula.env`): "
                      "single_turn (generate, then the verifier scores), tools (the model may "
                      "call `tools` between turns), or a plug-in's (entry-point group "
                      "nebula.environments).")
    max_turns: int = Field(4, gt=0, description="Most assistant turns of a multi-turn episode; "
                           "an episode still calling tools after it is truncated.")
    max_total_tokens: int | None = Field(
        None, gt=0, description="Most completion tokens of a whole episode (generated and "
        "observation tokens); none: max_turns x rollout.max_tokens plus observations, within "
        "the model's context. Each turn generates at most rollout.max_tokens.")
    tools: list[Literal["calculator", "python"]] = Field(
        default_factory=lambda: ["calculator"], description="Tools of the `tools` environment: "
        "calculator (arithmetic on numbers: + - * / // % ** and parentheses) and python (runs "
        "the code in the verifier's sandbox, answers its stdout and stderr).")
    tool_timeout_s: float = Field(10.0, gt=0, description="Limit of one tool call.")
    max_observation_chars: int = Field(1000, gt=0, description="A tool's answer is cut to "
                                       "this many characters.")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig,
                                   description="Isolation of the python tool.")
    max_batch: int = Field(0, ge=0, description="Most trajectories per engine call after the "
                           "first turn (0: every one waiting). Smaller batches let tool calls "
                           "of some trajectories overlap the generation of others.")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Options of a plug-in environment.")
