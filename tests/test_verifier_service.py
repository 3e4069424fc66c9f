"""The verifier service through gRPC on loopback: a real `python -m verifier` process."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nebula.v1 import verifier_pb2 as pb
from nebula.v1 import verifier_pb2_grpc as pb_grpc
from nebula.clients.verifier import VerifierClient
from nebula.clients.verifier import Item

# Catastrophic backtracking: this regex never finishes on this input (a hostile item).
EVIL_REGEX = {"pattern": r"^(a+)+$"}
EVIL_TEXT = "a" * 40 + "!"


@pytest.fixture()
def client(verifier_service: dict[str, Any]) -> VerifierClient:
    with VerifierClient(verifier_service["address"]) as c:
        yield c


def test_round_trip_math_and_order(client: VerifierClient) -> None:
    items = [
        Item("math", "so the result is \\boxed{\\frac{1}{2}}", "0.5", id="frac-vs-decimal"),
        Item("math", "The answer is 7.", "8", id="wrong"),
        Item("exact", " hello  world ", "hello world", id="exact"),
        Item("regex", "order #12345 shipped", metadata={"pattern": r"#\d{5}\b"}, id="regex"),
    ]
    res = client.verify(items)
    assert [r.id for r in res] == ["frac-vs-decimal", "wrong", "exact", "regex"]
    assert [r.status for r in res] == ["ok"] * 4
    assert [r.reward for r in res] == [1.0, 0.0, 1.0, 1.0]
    assert res[1].passed is False and "not equal" in res[1].reason
    assert res[0].verifier_version.startswith("1+math-verify")
    assert all(r.elapsed_s > 0 for r in res)


def test_list_verifiers(client: VerifierClient) -> None:
    names = {v["name"]: v for v in client.list_verifiers()}
    assert {"math", "code", "ifeval", "exact", "regex"} <= set(names)
    assert names["math"]["source"] == "builtin" and names["math"]["version"]


def test_unknown_verifier_is_invalid_argument_listing_known(client: VerifierClient) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        client.verify([Item("math", "1", "1"), Item("no-such-verifier", "x")])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-verifier" in ei.value.details() and "math" in ei.value.details()


def test_malformed_item_is_an_error_result_not_a_failed_batch(client: VerifierClient) -> None:
    res = client.verify([
        Item("math", "1", "1", metadata="{not json"),
        Item("math", "1", "1", metadata="[1, 2]"),
        Item("math", "the answer is 3", ""),
        Item("math", "x" * 30000, "1"),
        Item("math", "\\boxed{3}", "3"),
    ])
    assert [r.status for r in res] == ["error", "error", "error", "error", "ok"]
    assert "metadata is not valid JSON" in res[0].reason
    assert "metadata must be a JSON object" in res[1].reason
    assert "reference is empty" in res[2].reason
    assert "max_response_chars" in res[3].reason
    assert res[4].passed


def test_oversize_payload_and_batch_are_clear_errors(client: VerifierClient) -> None:
    with pytest.raises(grpc.RpcError) as ei:  # the service was started with max_message_mb=1
        client.verify([Item("exact", "y" * 15000, "y")] * 80)
    assert ei.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError) as ei:
        client.verify([Item("exact", "a", "a")] * 65)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_items is 64" in ei.value.details()


def test_hostile_item_does_not_hold_the_batch_past_its_deadline(client: VerifierClient) -> None:
    t0 = time.monotonic()
    res = client.verify([Item("regex", EVIL_TEXT, metadata=EVIL_REGEX),
                         Item("math", "\\boxed{4}", "4")], item_timeout_s=1.5)
    took = time.monotonic() - t0
    assert res[0].status == "timeout" and "deadline" in res[0].reason
    assert res[1].status == "ok" and res[1].passed
    assert took < 4.0, took
    # The killed worker was replaced: the service keeps serving full batches.
    again = client.verify([Item("math", f"\\boxed{{{i}}}", str(i)) for i in range(8)])
    assert all(r.passed for r in again)


def test_health_reflection_and_metrics(verifier_service: dict[str, Any],
                                       client: VerifierClient) -> None:
    with grpc.insecure_channel(verifier_service["address"]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        [resp] = list(stub.ServerReflectionInfo(iter([req])))
        services = {s.name for s in resp.list_services_response.service}
        assert {"nebula.v1.VerifierService", "grpc.health.v1.Health"} <= services
        raw = pb_grpc.VerifierServiceStub(ch).VerifyBatch(pb.VerifyBatchRequest(items=[
            pb.VerifyItem(verifier="exact", response="a", reference="a",
                          metadata_json=json.dumps({"ignore_case": True}))]))
        assert raw.results[0].status == pb.VerifyResult.STATUS_OK
    client.verify([Item("regex", EVIL_TEXT, metadata=EVIL_REGEX)], item_timeout_s=0.5)
    url = f"http://127.0.0.1:{verifier_service['metrics_port']}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'nebula_verifier_items_total{status="ok",verifier="exact"}' in body
    assert "nebula_verifier_item_latency_seconds_bucket" in body
    assert 'nebula_verifier_timeouts_total{verifier="regex"}' in body
    assert "nebula_verifier_requests_total" in body
