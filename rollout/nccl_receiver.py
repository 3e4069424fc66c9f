"""A rollout worker's side of NCCL weight sync (GPU): the inference side of vLLM's
VLLMWeightSyncClient protocol, driven by the learner's NcclWeightPusher
(learner/weight_sync.py).

The engine lock is held from start to the verified finish, so no batch samples from
half-loaded or unverified weights. A start whose finish does not come within the sync
timeout (learner gone, transfer hung) is abandoned by a watchdog: the lock is released and
the engine marked unusable (generation raises WeightSyncError) until a later update or load
is verified.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("nebula.rollout")


class NcclWeightReceiver:
    """RolloutWorker's NCCL weight-update methods (Ray calls them on the actor); the worker
    holds the engine, its lock and the weight client they use."""

    name: str
    engine: Any  # rollout.engine's vLLM engine
    weights: Any  # rollout.weight_loader.WeightLoader
    stats: dict[str, Any]
    _engine_lock: threading.Lock
    _update_mutex: threading.Lock
    _update: Any
    _update_timer: threading.Timer | None

    def weight_sync_ranks(self) -> int:
        """NCCL ranks this worker's engine takes in the learner's weight-sync group (its
        tensor-parallel workers)."""
        return int(getattr(self.engine, "tensor_parallel_size", 1))

    def init_weight_transfer_engine(self, request: Any) -> None:
        from nebula.weight_check import sync_timeout_s

        self.engine.weight_transfer_rpc("init_weight_transfer_engine", request.init_info,
                                        timeout=sync_timeout_s())

    def start_weight_update(self, version: int | None = None) -> None:
        from nebula.weight_check import WeightSyncError, sync_timeout_s

        timeout = sync_timeout_s()
        if not self._engine_lock.acquire(timeout=timeout):
            raise WeightSyncError(f"{self.name}: the engine was busy for {timeout:g} s; "
                                  f"weight update to version {version} not started")
        try:
            self.engine.weight_transfer_rpc("start_weight_update", timeout=timeout)
        except BaseException:
            self._engine_lock.release()
            raise
        token = object()
        self.weights.error = (f"{self.name}: the weight update to version {version} started "
                              "and was not verified")
        timer = threading.Timer(timeout, self._abandon_weight_update,
                                args=(token, version, timeout))
        timer.daemon = True
        with self._update_mutex:
            self._update, self._update_timer = token, timer
        timer.start()

    def _abandon_weight_update(self, token: Any, version: int | None, timeout: float) -> None:
        with self._update_mutex:
            if self._update is not token:  # finished in time
                return
            self._update, self._update_timer = None, None
            self.weights.error = (f"{self.name}: the weight update to version {version} did "
                                  f"not finish within {timeout:g} s (NEBULA_WEIGHT_SYNC_"
                                  "TIMEOUT_S); the engine's weights are half-loaded")
        log.error("%s", self.weights.error)
        self._engine_lock.release()

    def update_weights(self, request: Any) -> None:
        from nebula.weight_check import sync_timeout_s

        self.engine.weight_transfer_rpc("update_weights", request.update_info,
                                        timeout=sync_timeout_s())

    def finish_weight_update(self, version: int | None = None,
                             probes: dict[str, Any] | None = None) -> None:
        """End the update; with `probes` (the learner's probe tensors of what it sent,
        `nebula.weight_check.select_probes`) verify the engine holds them, then take
        `version`. A mismatch raises WeightSyncError and leaves the engine unusable."""
        from nebula.weight_check import WeightSyncError, sync_timeout_s

        with self._update_mutex:
            token, timer = self._update, self._update_timer
            self._update, self._update_timer = None, None
        if token is None:
            raise WeightSyncError(self.weights.error or f"{self.name}: finish_weight_update "
                                  "without a weight update in progress")
        if timer is not None:
            timer.cancel()
        try:
            self.engine.weight_transfer_rpc("finish_weight_update", timeout=sync_timeout_s())
            if probes is not None:
                self.weights.verify(probes, version if version is not None else -1)
            else:
                self.weights.error = None  # an older pusher: nothing to verify against
            if version is not None:
                self.engine.set_version(int(version))
                self.stats["weight_loads"] += 1
        finally:
            self._engine_lock.release()

    def update_weight_version(self, version: str) -> None:
        self.engine.set_version(int(version))
        self.stats["weight_loads"] += 1
