"""Third-party verifiers: an installed entry-point plug-in, and a remote gRPC verifier."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from procs import ROOT, verifier_server
from verifier.client import VerifierClient
from verifier.engine import Item


def test_entry_point_plugin_is_served(tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site),
                    str(ROOT / "tests" / "data" / "plugin")], check=True)
    assert list(site.glob("nebula_wordcount_plugin-*.dist-info"))
    with verifier_server(tmp_path, env={"PYTHONPATH": f"{site}:{ROOT}"}) as srv, \
            VerifierClient(srv["address"]) as client:
        info = {v["name"]: v for v in client.list_verifiers()}
        assert info["wordcount"]["source"] == "plugin:nebula-wordcount-plugin"
        assert info["wordcount"]["version"] == "0.0.1"
        res = client.verify([Item("wordcount", "one two three", "3"),
                             Item("wordcount", "one two", "3"),
                             Item("wordcount", "x", "three"),
                             Item("math", "\\boxed{1}", "1")])
        assert [(r.status, r.reward) for r in res] == [("ok", 1.0), ("ok", 0.0),
                                                       ("error", 0.0), ("ok", 1.0)]
        assert res[1].details == {"words": 2} and res[0].verifier_version == "0.0.1"
        assert "reference must be a word count" in res[2].reason


def test_remote_verifier_is_called_through_the_same_interface(tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    with verifier_server(tmp_path / "up") as upstream:
        remotes = {"remote-math": {"address": upstream["address"], "remote_name": "math"},
                   "remote-broken": {"address": "127.0.0.1:1", "timeout_s": 2}}
        with verifier_server(tmp_path, {"remotes": remotes}) as front, \
                VerifierClient(front["address"]) as client:
            info = {v["name"]: v for v in client.list_verifiers()}
            assert info["remote-math"]["source"] == f"remote:{upstream['address']}"
            res = client.verify([Item("remote-math", "\\boxed{0.25}", "\\frac14", id="a"),
                                 Item("remote-math", "\\boxed{3}", "4", id="b"),
                                 Item("remote-broken", "x", "x", id="c")])
            assert [r.id for r in res] == ["a", "b", "c"]
            assert res[0].status == "ok" and res[0].passed
            assert res[0].details["remote"]["verifier"] == "math"
            assert res[1].status == "ok" and not res[1].passed
            assert res[2].status in ("error", "timeout") and res[2].reason
