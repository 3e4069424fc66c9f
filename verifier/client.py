"""Python client of the verifier service (sync and asyncio)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from nebula.v1 import verifier_pb2 as pb
from nebula.v1 import verifier_pb2_grpc as pb_grpc
from verifier.engine import Item, ItemResult
from verifier.wire import item_to_pb, result_from_pb

_MB = 1 << 20


def channel_options(max_message_mb: int = 64) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_mb * _MB),
            ("grpc.max_receive_message_length", max_message_mb * _MB)]


class VerifierClient:
    """Blocking client; one channel, safe to share between threads."""

    def __init__(self, address: str, timeout_s: float = 120.0, max_message_mb: int = 64) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_mb))
        self._stub = pb_grpc.VerifierServiceStub(self._channel)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def verify(self, items: Sequence[Item], item_timeout_s: float = 0) -> list[ItemResult]:
        req = pb.VerifyBatchRequest(items=[item_to_pb(i) for i in items],
                                    item_timeout_s=item_timeout_s)
        resp = self._stub.VerifyBatch(req, timeout=self.timeout_s)
        return [result_from_pb(r) for r in resp.results]

    def list_verifiers(self) -> list[dict[str, Any]]:
        resp = self._stub.ListVerifiers(pb.ListVerifiersRequest(), timeout=self.timeout_s)
        return [{"name": v.name, "version": v.version, "description": v.description,
                 "source": v.source} for v in resp.verifiers]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VerifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVerifierClient:
    """asyncio client, for rollout workers and remote verifiers."""

    def __init__(self, address: str, timeout_s: float = 120.0, max_message_mb: int = 64) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_mb))
        self._stub = pb_grpc.VerifierServiceStub(self._channel)

    async def verify_pb(self, items: Sequence[pb.VerifyItem], item_timeout_s: float = 0,
                        timeout_s: float | None = None) -> list[pb.VerifyResult]:
        req = pb.VerifyBatchRequest(items=list(items), item_timeout_s=item_timeout_s)
        resp = await self._stub.VerifyBatch(req, timeout=timeout_s or self.timeout_s)
        return list(resp.results)

    async def verify(self, items: Sequence[Item], item_timeout_s: float = 0) -> list[ItemResult]:
        out = await self.verify_pb([item_to_pb(i) for i in items], item_timeout_s)
        return [result_from_pb(r) for r in out]

    async def close(self) -> None:
        await self._channel.close()
