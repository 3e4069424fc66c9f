"""Where the learner publishes weights and rollout workers fetch them: a small Ray actor
holding the newest (version, object ref). The weights travel through Ray's object store
(shared memory on one node); only the ref passes through this actor."""

from __future__ import annotations

from typing import Any


class WeightStore:
    def __init__(self) -> None:
        self.version = -1
        self.steps = -1  # learner steps of the current stage these weights include
        self._ref: list[Any] = []  # [ObjectRef] - wrapped so Ray does not resolve it here

    def publish(self, version: int, ref: list[Any], steps: int = -1) -> int:
        if version < self.version:
            raise ValueError(f"version {version} is older than {self.version}")
        self.version, self._ref, self.steps = version, ref, steps
        return version

    def latest(self) -> tuple[int, list[Any], int]:
        return self.version, self._ref, self.steps
