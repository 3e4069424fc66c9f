"""Conversions between nebula.v1 verifier messages and the engine's dataclasses."""

from __future__ import annotations

import json
from typing import Any

from nebula.v1 import verifier_pb2 as pb
from verifier.engine import ERROR, OK, TIMEOUT, Item, ItemResult

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
