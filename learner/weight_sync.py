"""GPU weight sync: the learner broadcasts new weights to every vLLM engine over NCCL.

One NCCL group spans the learner (rank 0) and the workers of every rollout engine: engine i's
tensor-parallel workers take ranks `1 + sum(tp of engines before i)` onward, world size
`1 + sum(tp)`. vLLM's weight-transfer API supports this as it is: its worker computes its rank
as `rank_offset + its rank in the engine`, so `EnginePoolClient` hands each engine its own
`rank_offset`, and `NCCLTrainerWeightTransferEngine` (vLLM's trainer side) streams the full
weights once per published version, straight from the learner's GPU into all the engines'
(one broadcast reaches every engine; no copy through host memory or Ray's object store).
The rollout worker exposes the inference side of vLLM's `VLLMWeightSyncClient` protocol
(rollout/worker.py).

Every sync is bounded and verified:
- each control call to the engines (`ray.get`) waits at most `sync_timeout_s()`
  (`NEBULA_WEIGHT_SYNC_TIMEOUT_S`, default 300 s), and so does the whole push, which runs in
  a side thread (an NCCL collective cannot be interrupted): a push that does not finish raises
  `WeightSyncError` instead of hanging the learner. The group is then unusable (a peer may be
  stuck inside the collective): every later push raises at once and the job fails loudly;
  re-forming the group needs new actors (a restarted learner attaches again).
- while broadcasting, the learner keeps CPU copies of the probe tensors
  (`nebula.weight_check.select_probes`: a few hundred rows of the embedding, the final norm)
  and sends them with `finish_weight_update(version, probes)`: each rollout worker checks what
  its engine now holds against them before it takes the version and generates again.

Limitation: an engine restarted by Ray (crash) is not in the group; the next push times out
and fails as above. GPU only: the CPU path publishes through the object store (and is
checked by fingerprint, rollout/weight_loader.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any


def nccl_available(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and torch.distributed.is_nccl_available()


def rank_offsets(tp_sizes: list[int]) -> tuple[list[int], int]:
    """Each engine's first rank in the shared group (the learner is rank 0) and the group's
    world size."""
    offsets, nxt = [], 1
    for tp in tp_sizes:
        if int(tp) < 1:
            raise ValueError(f"an engine with {tp} tensor-parallel workers")
        offsets.append(nxt)
        nxt += int(tp)
    return offsets, nxt


class EnginePoolClient:
    """vLLM's `VLLMWeightSyncClient` protocol over several rollout workers sharing one NCCL
    group: each call fans out to every worker and waits for all of them, at most `timeout_s`;
    init gives each engine its own rank offset; finish carries the version and the probes."""

    def __init__(self, handles: list[Any], offsets: list[int], timeout_s: float) -> None:
        self.handles, self.offsets, self.timeout_s = handles, offsets, timeout_s
        self.version: int | None = None
        self.probes: dict[str, Any] | None = None

    def _wait(self, refs: list[Any], what: str) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError

        from nebula.weight_check import WeightSyncTimeout

        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise WeightSyncTimeout(f"NCCL weight sync: {what} of version {self.version} did not "
                                  f"answer within {self.timeout_s:g} s on every rollout "
                                  "engine (NEBULA_WEIGHT_SYNC_TIMEOUT_S)") from None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self._wait([h.init_weight_transfer_engine.remote(
            WeightTransferInitRequest(init_info=dict(init_info, rank_offset=off)))
            for h, off in zip(self.handles, self.offsets)], "init_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._wait([h.start_weight_update.remote(self.version) for h in self.handles],
                   "start_weight_update")

    def update_weights(self, update_info: Any) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        request = WeightTransferUpdateRequest(update_info=update_info)
        self._wait([h.update_weights.remote(request) for h in self.handles], "update_weights")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._wait([h.finish_weight_update.remote(self.version, self.probes)
                    for h in self.handles], "finish_weight_update")

    def shutdown_weight_transfer_engine(self) -> None:  # part of the protocol; unused
        pass


def _run_bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run `fn` in a daemon thread on this thread's CUDA device; raise WeightSyncError if it
    takes longer than `timeout_s` (the thread is left behind, blocked in NCCL)."""
    import torch

    from nebula.weight_check import WeightSyncTimeout

    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=body, name="nccl-weight-sync", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise WeightSyncTimeout(f"NCCL weight sync: {what} did not finish within {timeout_s:g} s "
                              "(NEBULA_WEIGHT_SYNC_TIMEOUT_S); an engine or the learner is "
                              "stuck in the collective")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class NcclWeightPusher:
    def __init__(self, full_state: Callable[[], dict[str, Any]], rollouts: list[Any],
                 tp_size: int | None = None, timeout_s: float | None = None) -> None:
        """`full_state()` returns the Hugging Face-named full weights on the learner's GPU;
        `rollouts` are RolloutWorker actor handles whose engines were built with
        `weight_transfer="nccl"`. Each engine's tensor-parallel size is asked from its worker
        (`weight_sync_ranks`); `tp_size` is ignored (kept for callers that pass it)."""
        import ray
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        from nebula.service_process import free_port
        from nebula.weight_check import PROBE_NAMES, select_probes, sync_timeout_s

        self.timeout_s = float(timeout_s) if timeout_s is not None else sync_timeout_s()
        self._broken: str | None = None
        client_box: list[EnginePoolClient] = []

        class StateSource(WeightSource):  # the learner's weights, gathered (ZeRO-3 too)
            def __init__(self) -> None:
                self._meta: list[ParamMeta] | None = None

            def metadata(self) -> list[ParamMeta]:
                if self._meta is None:
                    self._meta = [ParamMeta(k, t.dtype, tuple(t.shape))
                                  for k, t in full_state().items()]
                return self._meta

            def __iter__(self) -> Iterator[tuple[str, Any]]:
                probes: dict[str, Any] = {}
                client_box[0].probes = probes  # filled as the tensors stream by
                for name, t in full_state().items():
                    if name in PROBE_NAMES:  # kept (a few rows) for the engines' check
                        probes.update(select_probes({name: t}))
                    yield name, t

        self.rollouts = rollouts
        self.client = EnginePoolClient(rollouts, [], self.timeout_s)
        tps = [int(x) for x in self.client._wait(
            [h.weight_sync_ranks.remote() for h in rollouts], "weight_sync_ranks")]
        offsets, world_size = rank_offsets(tps)
        self.client.offsets = offsets
        client_box.append(self.client)
        host = ray.util.get_node_ip_address()
        info = NCCLTrainerInitInfo(master_address=host, master_port=free_port(),
                                   world_size=world_size, rank=0)
        self.engine = _run_bounded(
            lambda: NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=self.client, source=StateSource()),
            self.timeout_s, f"opening the group of {world_size} ranks")

    def push(self, version: int) -> None:
        """Every engine holds `version`, verified, when this returns (each waits for its
        current batch). Raises WeightSyncError if it does not within the timeout."""
        from nebula.weight_check import WeightSyncError, WeightSyncTimeout

        if self._broken is not None:
            raise WeightSyncError(self._broken)
        self.client.version, self.client.probes = int(version), None
        try:
            _run_bounded(self.engine.send_weights, self.timeout_s,
                         f"pushing version {version}")
        except WeightSyncTimeout as e:
            self._broken = (f"NCCL weight sync group unusable after a failed push ({e}); "
                            "restart the learner")
            raise
