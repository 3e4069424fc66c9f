"""Where the learner publishes weights and rollout workers fetch them: a small Ray actor
holding the newest (version, object ref, steps, fingerprint). The weights travel through
Ray's object store (shared memory on one node); only the ref passes through this actor.

`fingerprint` is `nebula.weight_check.blob_fingerprint` of the published blob: a rollout
worker refuses a fetched blob whose fingerprint differs (a corrupted or mixed-up object).
"""

from __future__ import annotations

from typing import Any


class WeightStore:
    def __init__(self) -> None:
        self.version = -1
        self.steps = -1  # learner steps of the current stage these weights include
        self._ref: list[Any] = []  # [ObjectRef] - wrapped so Ray does not resolve it here
        self.fingerprint: str | None = None

    def publish(self, version: int, ref: list[Any], steps: int = -1,
                fingerprint: str | None = None) -> int:
        """Announce `version` (never older than the current one). A version's weights never
        change: re-publishing the current version (new `steps`) without a fingerprint keeps
        the one it was published with."""
        if version < self.version:
            raise ValueError(f"version {version} is older than {self.version}")
        if fingerprint is None and version == self.version:
            fingerprint = self.fingerprint
        self.version, self._ref, self.steps = version, ref, steps
        self.fingerprint = fingerprint
        return version

    def latest(self) -> tuple[int, list[Any], int, str | None]:
        """(version, [ObjectRef] or [] when nothing was put, steps, fingerprint or None)."""
        return self.version, self._ref, self.steps, self.fingerprint
