"""Entry-point plug-ins: the classes an installed package registers under a group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def load_entry_points(group: str, base: type, register: Callable[[Any], Any],
                      name_of: Callable[[Any], str]) -> None:
    """Load every entry point of `group`: each must be a subclass of `base` whose name
    (`name_of(cls)`) is the entry point's; `register` takes it."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"entry point {ep.name} = {ep.value} of {group} is not a "
                            f"{base.__name__} subclass")
        if name_of(cls) != ep.name:
            raise ValueError(f"entry point {ep.name} = {ep.value} of {group} registers "
                             f"{name_of(cls)!r}, not {ep.name!r}")
        register(cls)
