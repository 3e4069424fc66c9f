"""MOPD: on-policy distillation from several teachers, each sample scored by the teacher of
its prompt's domain."""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from nebula.algo.opd import OPD
from nebula.config.stage import StageConfig


class UnroutedDomainError(ValueError):
    """A prompt's domain has no teacher in the MOPD routing table."""


class MOPDStage(StageConfig):
    """Multi-teacher OPD: each sample is scored by the teacher of its prompt's domain."""

    type: Literal["mopd"] = "mopd"
    routing: dict[str, str] = Field(..., min_length=1, description="Domain tag -> teacher name. "
                                    "Every domain of the training prompts must be listed.")
    alpha: float = Field(0.0, ge=0, description="As in `opd`: weight of the outcome advantage.")
    baseline: Literal["none", "group"] = Field("group", description="As in `opd`.")
    top_k: int = Field(0, ge=0, le=1024, description="As in `opd`.")


class MOPD(OPD):
    Config = MOPDStage

    def teachers(self) -> list[str]:
        return sorted(set(self.stage.routing.values()))

    def teacher_for(self, domain: str) -> str:
        try:
            return self.stage.routing[domain]
        except KeyError:
            raise UnroutedDomainError(
                f"mopd routing has no teacher for domain {domain!r} (routed: "
                f"{', '.join(sorted(self.stage.routing))})") from None

    def check_domains(self, domains: Sequence[str]) -> None:
        """Raise UnroutedDomainError naming every domain the stage cannot route."""
        missing = sorted(set(domains) - self.stage.routing.keys())
        if missing:
            raise UnroutedDomainError(
                f"no teacher for domain(s) {', '.join(map(repr, missing))} of the training "
                f"prompts (mopd routes: {', '.join(sorted(self.stage.routing))})")

    def check_config(self, where: str) -> None:
        # Datasets with one static domain are known now; per-row domains at preflight.
        static = [d.domain or "" for d in self.job.datasets.train if d.domain_field is None]
        try:
            self.check_domains(static)
        except UnroutedDomainError as e:
            raise ValueError(f"{where}.routing: {e} (set `domain` or `domain_field` on each "
                             "dataset)") from None

    def preflight(self, where: str, tokenizer: object, context_len: int,
                  train_domains: Sequence[str]) -> None:
        try:
            self.check_domains(train_domains)
        except UnroutedDomainError as e:
            raise ValueError(f"{where}.routing: {e}") from None
