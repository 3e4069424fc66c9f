"""Client side of the verifier service (`proto/nebula/v1/verifier.proto`): the items and
results every role uses, their wire conversions, and the sync/async gRPC clients. Roles that
call the service (rollout, services) import this module, not the `verifier` package."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from nebula.supervisor import DEFAULT_RETRY_S, RECONNECT_OPTIONS, acall_retrying, call_retrying
from nebula.v1 import verifier_pb2 as pb
from nebula.v1 import verifier_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

OK, ERROR, TIMEOUT = "ok", "error", "timeout"


@dataclass
class Item:
    verifier: str
    response: str
    reference: str = ""
    metadata: dict[str, Any] | str | None = None  # dict, or JSON text from the wire
    id: str = ""


@dataclass
class ItemResult:
    id: str
    verifier: str
    status: str
    reward: float = 0.0
    passed: bool = False
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    verifier_version: str = ""
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "verifier": self.verifier, "status": self.status,
            "reward": self.reward, "passed": self.passed, "reason": self.reason,
            "details": self.details, "verifier_version": self.verifier_version,
            "elapsed_s": round(self.elapsed_s, 6),
        }


_STATUS_TO_PB = {OK: pb.VerifyResult.STATUS_OK, ERROR: pb.VerifyResult.STATUS_ERROR,
                 TIMEOUT: pb.VerifyResult.STATUS_TIMEOUT}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def item_to_pb(item: Item) -> pb.VerifyItem:
    md = item.metadata
    md_json = md if isinstance(md, str) else json.dumps(md or {})
    return pb.VerifyItem(verifier=item.verifier, response=item.response,
                         reference=item.reference or "", metadata_json=md_json, id=item.id)


def item_from_pb(m: pb.VerifyItem) -> Item:
    return Item(verifier=m.verifier, response=m.response, reference=m.reference,
                metadata=m.metadata_json or None, id=m.id)


def result_to_pb(r: ItemResult) -> pb.VerifyResult:
    return pb.VerifyResult(
        id=r.id, verifier=r.verifier, status=_STATUS_TO_PB[r.status], reward=r.reward,
        passed=r.passed, reason=r.reason, details_json=json.dumps(r.details, default=str),
        verifier_version=r.verifier_version, elapsed_s=r.elapsed_s,
    )


def result_from_pb(m: pb.VerifyResult) -> ItemResult:
    details: dict[str, Any] = json.loads(m.details_json) if m.details_json else {}
    return ItemResult(
        id=m.id, verifier=m.verifier, status=_STATUS_FROM_PB.get(m.status, ERROR),
        reward=m.reward, passed=m.passed, reason=m.reason, details=details,
        verifier_version=m.verifier_version, elapsed_s=m.elapsed_s,
    )


_MB = 1 << 20


def channel_options(max_message_mb: int = 64) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_mb * _MB),
            ("grpc.max_receive_message_length", max_message_mb * _MB), *RECONNECT_OPTIONS]


class VerifierClient:
    """Blocking client; one channel, safe to share between threads.

    Every call has a deadline (`timeout_s`). A call that finds the service UNAVAILABLE (down,
    being restarted by its supervisor, connection reset mid-call) is sent again with the same
    items for up to `retry_s` of outage, one log line per outage; scoring is a pure function
    of the items, so the retried call answers what the first would have. `stats` counts
    outages and retries."""

    def __init__(self, address: str, timeout_s: float = 120.0, max_message_mb: int = 64,
                 retry_s: float = DEFAULT_RETRY_S) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.stats: dict[str, int] = {"outages": 0, "retries": 0}
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_mb))
        self._stub = pb_grpc.VerifierServiceStub(self._channel)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        log.info("waiting up to %.0f s for the verifier at %s", timeout_s, self.address)
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def _call(self, method: Any, request: Any) -> Any:
        return call_retrying(method, request, timeout_s=self.timeout_s, retry_s=self.retry_s,
                             what=f"verifier at {self.address}", stats=self.stats)

    def verify(self, items: Sequence[Item], item_timeout_s: float = 0) -> list[ItemResult]:
        req = pb.VerifyBatchRequest(items=[item_to_pb(i) for i in items],
                                    item_timeout_s=item_timeout_s)
        resp = self._call(self._stub.VerifyBatch, req)
        return [result_from_pb(r) for r in resp.results]

    def list_verifiers(self) -> list[dict[str, Any]]:
        resp = self._call(self._stub.ListVerifiers, pb.ListVerifiersRequest())
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

    def __init__(self, address: str, timeout_s: float = 120.0, max_message_mb: int = 64,
                 retry_s: float = DEFAULT_RETRY_S) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.stats: dict[str, int] = {"outages": 0, "retries": 0}
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_mb))
        self._stub = pb_grpc.VerifierServiceStub(self._channel)

    async def verify_pb(self, items: Sequence[pb.VerifyItem], item_timeout_s: float = 0,
                        timeout_s: float | None = None,
                        retry_s: float | None = None) -> list[pb.VerifyResult]:
        """One VerifyBatch call with a deadline of `timeout_s` per attempt, sent again while
        the service is UNAVAILABLE for up to `retry_s` (default: the client's)."""
        req = pb.VerifyBatchRequest(items=list(items), item_timeout_s=item_timeout_s)
        resp = await acall_retrying(self._stub.VerifyBatch, req,
                                    timeout_s=timeout_s or self.timeout_s,
                                    retry_s=self.retry_s if retry_s is None else retry_s,
                                    what=f"verifier at {self.address}", stats=self.stats)
        return list(resp.results)

    async def verify(self, items: Sequence[Item], item_timeout_s: float = 0) -> list[ItemResult]:
        out = await self.verify_pb([item_to_pb(i) for i in items], item_timeout_s)
        return [result_from_pb(r) for r in out]

    async def close(self) -> None:
        await self._channel.close()
