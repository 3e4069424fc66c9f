"""The algorithm registry: stage `type` -> `Algorithm` subclass (see `nebula.algo.base`).

Built-ins: sft, dpo, grpo, opd, mopd. Plug-ins register through the entry-point group
`nebula.algorithms` (name = stage type, value = `module:AlgorithmClass`); they are found when
`nebula.config.job` is first imported, so a plug-in's stage type validates in job configs
like a built-in one, over the CLI, REST and ConfigMaps alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field

from nebula.algo.base import Algorithm, Example, LossInput
from nebula.config.stage import StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from nebula.config.job import JobConfig

__all__ = ["Algorithm", "Example", "LossInput", "algorithm", "algorithms", "informative",
           "register", "stage_union"]

ENTRY_POINT_GROUP = "nebula.algorithms"
_REGISTRY: dict[str, type[Algorithm]] = {}
_loaded = False


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Register an algorithm under its stage config's `type` (usable as a decorator)."""
    name = cls.type_name()
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"algorithm {name!r} is already registered by "
                         f"{_REGISTRY[name].__module__}")
    _REGISTRY[name] = cls
    return cls


def algorithms() -> dict[str, type[Algorithm]]:
    """Every registered algorithm: the built-ins, then the installed plug-ins."""
    global _loaded
    if not _loaded:
        _loaded = True
        from nebula.algo.dpo import DPO
        from nebula.algo.grpo import GRPO
        from nebula.algo.mopd import MOPD
        from nebula.algo.opd import OPD
        from nebula.algo.sft import SFT

        for cls in (SFT, DPO, GRPO, OPD, MOPD):
            register(cls)
        from nebula.plugins import load_entry_points

        load_entry_points(ENTRY_POINT_GROUP, Algorithm, register, lambda c: c.type_name())
    return dict(_REGISTRY)


def stage_union() -> Any:
    """The job config's stage type: the registered stage configs, discriminated by `type`."""
    configs = tuple(cls.Config for cls in algorithms().values())
    return Annotated[Union[configs], Field(discriminator="type")]  # type: ignore[valid-type]


def informative(group: Any) -> bool:
    """Whether a trajectory group carries any advantage to learn from: a group whose rewards
    are all equal (and no per-token advantages) has none. The learner skips such groups
    (`learner.skip_uniform_groups`); dynamic sampling regenerates them."""
    return any(s.advantage != 0 or len(s.token_advantages) for s in group.samples)


def algorithm(stage: StageConfig | dict[str, Any], job: JobConfig | None = None) -> Algorithm:
    """The algorithm instance of one stage (a config model or its dict)."""
    registry = algorithms()
    name = stage.get("type") if isinstance(stage, dict) else stage.type
    cls = registry.get(str(name))
    if cls is None:
        raise ValueError(f"unknown stage type {name!r} (registered: "
                         f"{', '.join(sorted(registry))})")
    if isinstance(stage, dict):
        stage = cls.Config.model_validate(stage)
    return cls(stage, job)
