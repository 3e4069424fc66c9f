"""Which verifiers a service can run: built-ins, `nebula.verifiers` entry points, remotes."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from nebula.config import VerifierServiceConfig
from verifier.api import AsyncVerifier, Verifier

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nebula.verifiers"

# name -> "module:Class"; imported lazily so a worker only pays for what it runs.
BUILTINS: dict[str, str] = {
    "math": "verifier.builtin.math:MathVerifier",
    "code": "verifier.builtin.code:CodeVerifier",
    "ifeval": "verifier.builtin.ifeval:IFEvalVerifier",
    "exact": "verifier.builtin.simple:ExactVerifier",
    "regex": "verifier.builtin.simple:RegexVerifier",
    "reasoning_gym": "verifier.builtin.reasoning_gym:ReasoningGymVerifier",
}


@dataclass
class Entry:
    name: str
    source: str  # "builtin", "plugin:<dist>", "remote:<address>"
    target: str | type  # "module:Class" or a loaded class
    remote: bool = False

    def load_class(self) -> type:
        if isinstance(self.target, type):
            return self.target
        module, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, (Verifier, AsyncVerifier))):
            raise TypeError(f"{self.target} is not a Verifier or AsyncVerifier subclass")
        self.target = cls
        return cls


class Registry:
    def __init__(self, config: VerifierServiceConfig) -> None:
        self.config = config
        self.entries: dict[str, Entry] = {
            n: Entry(n, "builtin", t) for n, t in BUILTINS.items()
        }
        if config.load_plugins:
            self._load_plugins()
        for name, remote in config.remotes.items():
            self.entries[name] = Entry(name, f"remote:{remote.address}", "", remote=True)
        self._instances: dict[str, Verifier | AsyncVerifier] = {}

    def _load_plugins(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            if ep.name in self.entries:
                log.warning("plug-in %s from %s shadows a built-in; ignored", ep.name, dist)
                continue
            self.entries[ep.name] = Entry(ep.name, f"plugin:{dist}", ep.value)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> Verifier | AsyncVerifier:
        """The instance for `name` (created once); KeyError when unknown."""
        inst = self._instances.get(name)
        if inst is None:
            entry = self.entries[name]
            if entry.remote:
                from verifier.remote import RemoteVerifier

                inst = RemoteVerifier(name, self.config.remotes[name], self.config)
            else:
                inst = entry.load_class()(self.config)
            self._instances[name] = inst
        return inst

    def is_async(self, name: str) -> bool:
        entry = self.entries[name]
        return entry.remote or issubclass(entry.load_class(), AsyncVerifier)

    def info(self) -> list[dict[str, Any]]:
        out = []
        for name in self.names():
            entry = self.entries[name]
            version, description = "", ""
            try:
                if entry.remote:
                    description = f"remote verifier at {self.config.remotes[name].address}"
                else:
                    cls = entry.load_class()
                    version, description = cls.version, cls.description
            except Exception as e:  # noqa: BLE001 - a broken plug-in must not hide the others
                description = f"failed to load: {e}"
            out.append({"name": name, "version": version, "description": description,
                        "source": entry.source})
        return out

    async def aclose(self) -> None:
        for inst in self._instances.values():
            if isinstance(inst, AsyncVerifier):
                await inst.aclose()
