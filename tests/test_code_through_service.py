"""Hostile code through the running verifier service: every attack is stopped and reported
with its reason in one batch, and the service keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from nebula.clients.verifier import VerifierClient
from nebula.clients.verifier import Item
from nebula.sandbox import Sandbox

ATTACKS = {
    "infinite_loop": ("while True:\n    pass\n", ("time_limit", "wall_timeout")),
    "memory_4gb": ("x = bytearray(4 * 1024 ** 3)\n", "memory_limit"),
    "tcp_connect": ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)\n",
                    "network_blocked"),
    "write_etc": ("open('/etc/nebula-pwned', 'w').write('x')\n", "write_blocked"),
    "write_outside": ("open('/var/tmp/nebula-pwned', 'w').write('x')\n", "write_blocked"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", "process_limit"),
}


@pytest.fixture(scope="module", autouse=True)
def _need_sandbox() -> None:
    why = Sandbox().probe()
    if why:
        pytest.skip(f"sandbox unavailable here: {why}")


def test_attacks_are_stopped_and_the_service_keeps_serving(verifier_service: dict[str, Any]
                                                           ) -> None:
    items = [Item("code", code, metadata={"test_list": ["assert True"]}, id=name)
             for name, (code, _) in ATTACKS.items()]
    items.append(Item("code", "def add(a, b):\n    return a + b\n",
                      metadata={"test_list": ["assert add(1, 2) == 3"]}, id="honest"))
    items.append(Item("math", "\\boxed{12}", "12", id="math"))
    with VerifierClient(verifier_service["address"]) as client:
        res = {r.id: r for r in client.verify(items, item_timeout_s=20)}
        for name, (_, violation) in ATTACKS.items():
            r = res[name]
            assert r.status == "ok" and r.reward == 0.0 and not r.passed, (name, r)
            expected = violation if isinstance(violation, tuple) else (violation,)
            assert r.details["violation"] in expected, (name, r.details, r.reason)
            assert r.details["violation"] in r.reason, (name, r.reason)
        assert res["honest"].passed and res["math"].passed
        import os

        assert not os.path.exists("/etc/nebula-pwned")
        assert not os.path.exists("/var/tmp/nebula-pwned")
        # Still serving, sandboxed and not.
        again = client.verify([Item("code", "print(int(input()) * 2)",
                                    metadata={"inputs": ["21\n"], "outputs": ["42\n"]}),
                               Item("exact", "ok", "ok")])
        assert [r.passed for r in again] == [True, True]
