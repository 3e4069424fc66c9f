"""The rollout side of the object-store weight sync: fetch the newest published weights,
check them and load them into the engine, verified, never waiting forever.

- Every Ray fetch (the store's `latest`, the blob) waits at most `timeout_s`
  (`NEBULA_WEIGHT_SYNC_TIMEOUT_S`, default 300 s), then raises `WeightSyncError`.
- A blob whose fingerprint differs from the one published with it is refused before the
  engine sees it.
- After a load the engine reports what it holds of a few probe tensors, compared with the
  blob's; a mismatch raises `WeightSyncError`. From the moment a load starts until it is
  verified, `error` is set: `check_usable` raises, so the worker never generates with
  weights it has not verified, and the next sync loads the newest weights again.
"""

from __future__ import annotations

import logging
from typing import Any

from nebula.weight_check import (
    WeightSyncError,
    WeightSyncTimeout,
    blob_probes,
    check_blob,
    sync_timeout_s,
    verify_probes,
)

log = logging.getLogger("nebula.rollout")


class WeightLoader:
    def __init__(self, store: Any, engine: Any, timeout_s: float | None = None,
                 name: str = "rollout") -> None:
        self.store, self.engine, self.name = store, engine, name
        self.timeout_s = float(timeout_s) if timeout_s is not None else sync_timeout_s()
        # Set while the engine's weights are not known to be the ones published (a load, or
        # an NCCL update, started and not verified); cleared by a verified load.
        self.error: str | None = None
        self._warned_unverifiable = False

    # -- fetches --------------------------------------------------------------------------

    def _get(self, ref: Any, what: str) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(ref, timeout=self.timeout_s)
        except GetTimeoutError:
            raise WeightSyncTimeout(
                f"{self.name}: {what} did not arrive within {self.timeout_s:g} s "
                f"(NEBULA_WEIGHT_SYNC_TIMEOUT_S); the weight store or the object holding the "
                f"weights is unreachable") from None

    def latest(self) -> tuple[int, list[Any], int, str | None]:
        """The store's (version, [ref], steps, fingerprint)."""
        got = tuple(self._get(self.store.latest.remote(), "the weight store's latest version"))
        if len(got) == 3:  # a store without fingerprints
            got = (*got, None)
        version, refs, steps, fingerprint = got
        return int(version), list(refs), int(steps), fingerprint

    def fetch(self, ref: Any, version: int) -> bytes:
        return self._get(ref, f"the weights of version {version}")

    # -- loads ----------------------------------------------------------------------------

    def load(self, blob: bytes, version: int, fingerprint: str | None) -> None:
        """Check the blob against its published fingerprint, load it, verify the engine."""
        check_blob(blob, fingerprint, version)  # refused before the engine sees it
        probes = blob_probes(blob)
        self.error = (f"{self.name}: loading the weights of version {version} did not "
                      "complete; the engine's weights are unknown")
        self.engine.load_weights(blob, version)
        self.verify(probes, version)

    def verify(self, probes: dict[str, Any], version: int) -> None:
        """Compare the engine's probe tensors with `probes` (of the weights sent). Clears
        `error` when they match; sets it and raises `WeightSyncError` otherwise."""
        try:
            reports = self.engine.weights_report()
            if reports is None:
                if not self._warned_unverifiable:
                    log.warning("%s: engine %s cannot report its weights; loads are not "
                                "verified", self.name, type(self.engine).__name__)
                    self._warned_unverifiable = True
            else:
                verify_probes(probes, reports, version, where=f"{self.name}'s engine")
        except WeightSyncError as e:
            self.error = str(e)
            raise
        except Exception as e:  # noqa: BLE001 - any failure to verify is a failed sync
            self.error = (f"{self.name}: could not verify the weights of version {version}: "
                          f"{type(e).__name__}: {e}")
            raise WeightSyncError(self.error) from e
        self.error = None

    def check_usable(self) -> None:
        """Raise `WeightSyncError` if the engine's weights are not verified."""
        if self.error is not None:
            raise WeightSyncError(f"{self.error}; not generating with them")
