"""Base of every stage's config. Each algorithm (`nebula.algo`) defines its own stage model
with a literal `type`; the job's `stages` list is the union of the registered ones."""

from __future__ import annotations

from pydantic import Field

from nebula.config.verifier import Strict


class StageConfig(Strict):
    type: str = Field(..., description="The stage's algorithm (sft, dpo, grpo, opd, mopd or "
                      "a plug-in's).")
    steps: int = Field(50, gt=0, description="Learner optimizer steps of the stage (policy "
                       "versions).")
