"""GPU weight sync: the learner broadcasts new weights to each vLLM engine over NCCL.

Uses vLLM's own trainer-side transfer engine (`NCCLTrainerWeightTransferEngine`): one NCCL
group per rollout worker (the learner is rank 0, the engine's workers ranks 1..tp), opened
once; each `push` streams the full weights straight from the learner's GPU into the
engine's, with no copy through host memory or Ray's object store. The rollout worker exposes
the inference side of vLLM's `VLLMWeightSyncClient` protocol (rollout/worker.py), so
`RayVLLMWeightSyncClient` drives it. GPU only: the CPU path publishes through the object store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def nccl_available(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and torch.distributed.is_nccl_available()


class NcclWeightPusher:
    def __init__(self, full_state: Callable[[], dict[str, Any]], rollouts: list[Any],
                 tp_size: int = 1) -> None:
        """`full_state()` returns the Hugging Face-named full weights on the learner's GPU;
        `rollouts` are RolloutWorker actor handles whose engines were built with
        `weight_transfer="nccl"`."""
        import ray
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        from nebula.service_process import free_port

        class StateSource(WeightSource):  # the learner's weights, gathered (ZeRO-3 too)
            def __init__(self) -> None:
                self._meta: list[ParamMeta] | None = None

            def metadata(self) -> list[ParamMeta]:
                if self._meta is None:
                    self._meta = [ParamMeta(k, t.dtype, tuple(t.shape))
                                  for k, t in full_state().items()]
                return self._meta

            def __iter__(self) -> Iterator[tuple[str, Any]]:
                yield from full_state().items()

        host = ray.util.get_node_ip_address()
        self.rollouts = rollouts
        self.engines = []
        for handle in rollouts:
            info = NCCLTrainerInitInfo(master_address=host, master_port=free_port(),
                                       world_size=1 + tp_size, rank=0)
            self.engines.append(NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=RayVLLMWeightSyncClient(handle), source=StateSource()))

    def push(self, version: int) -> None:
        """Every engine holds `version` when this returns (each waits for its current batch)."""
        import ray

        for engine, handle in zip(self.engines, self.rollouts):
            engine.send_weights()
            ray.get(handle.update_weight_version.remote(str(version)))
