"""The environment registry: name -> `Environment` subclass (see `nebula.env.base`).

Built-ins: single_turn, tools. Plug-ins register through the entry-point group
`nebula.environments` (name = `rollout.environment.name`, value = `module:Class`).
"""

from __future__ import annotations

from nebula.config.env import EnvironmentConfig
from nebula.env.base import Environment, StepResult

__all__ = ["Environment", "StepResult", "environment_class", "environments", "register"]

ENTRY_POINT_GROUP = "nebula.environments"
_REGISTRY: dict[str, type[Environment]] = {}
_loaded = False


def register(cls: type[Environment]) -> type[Environment]:
    """Register an environment under its `name` (usable as a decorator)."""
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"environment {cls.name!r} is already registered by "
                         f"{_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def environments() -> dict[str, type[Environment]]:
    global _loaded
    if not _loaded:
        _loaded = True
        from nebula.env.single_turn import SingleTurn
        from nebula.env.tools import ToolEnvironment

        register(SingleTurn)
        register(ToolEnvironment)
        from nebula.plugins import load_entry_points

        load_entry_points(ENTRY_POINT_GROUP, Environment, register, lambda c: c.name)
    return dict(_REGISTRY)


def environment_class(cfg: EnvironmentConfig) -> type[Environment]:
    registry = environments()
    cls = registry.get(cfg.name)
    if cls is None:
        raise ValueError(f"rollout.environment.name: unknown environment {cfg.name!r} "
                         f"(registered: {', '.join(sorted(registry))})")
    return cls
