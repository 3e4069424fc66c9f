"""Third-party plug-ins: an entry-point verifier, a remote gRPC verifier, and an entry-point
algorithm (a new stage type) trained through a whole job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from procs import ROOT, verifier_server
from nebula.clients.verifier import VerifierClient
from nebula.clients.verifier import Item


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


PLUGIN_JOB = r"""
import json, sys
from pathlib import Path
from api_procs import toy_job
from nebula.algo import algorithms
from nebula.config import load_model
from nebula.config.job import JobConfig
from nebula.tasks.synthetic import make_split
from services.runner import JobRunner

tmp = Path(sys.argv[1])
assert algorithms()["rloo"].__module__ == "nebula_rloo"
from nebula.env import environments
assert environments()["second-look"].__module__ == "nebula_rloo"
train, held = make_split("addition_pref", tmp / "pref", eval_size=50)
data = toy_job(tmp, sft_steps=8, output_dir=str(tmp / "run"))
data["stages"] = [
    {"type": "sft", "steps": 8, "batch_size": 16, "lr": 0.003},
    {"type": "dpo", "steps": 3, "batch_size": 8, "lr": 0.001, "beta": 0.1,
     "dataset": {"path": str(train), "limit": 64}, "eval_dataset": {"path": str(held)}},
    {"type": "rloo", "steps": 2}]
# Turns end at a digit (the toy's answers are digits), so episodes take their two turns.
data["rollout"].update(environment={"name": "second-look", "max_turns": 2},
                       stop=list("0123456789"))
summary = JobRunner(load_model(JobConfig, data), job_id="plug").run()
print("SUMMARY " + json.dumps(summary, default=str))
"""


def test_algorithm_plugin_and_the_chain_run_a_job(tmp_path: Path) -> None:
    """A third-party algorithm (RLOO) and environment (two turns) from one installed package
    (tests/data/algo_plugin, entry points) are a stage type and an environment like built-in
    ones: they validate in a job config and train through the runner, the rollout workers
    (multi-turn episodes on the real vLLM engine) and the learner, after SFT and DPO stages
    (the Tülu chain's shape), without any change to Nebula's code."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site),
                    str(ROOT / "tests" / "data" / "algo_plugin")], check=True)
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}:{ROOT / 'tests'}"}
    out = subprocess.run([sys.executable, "-c", PLUGIN_JOB, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("SUMMARY ")][-1]
    summary = json.loads(line.removeprefix("SUMMARY "))
    sft, dpo, rloo = summary["stages"]
    assert [sft["stage"], dpo["stage"], rloo["stage"]] == ["sft0", "dpo1", "rloo2"]
    assert rloo["tickets_trained_n"] == 2 * 2 and rloo["steps"] == 2
    held = dpo["held_out"]
    assert held["before"]["pref_pairs"] == held["after"]["pref_pairs"] == 50
    assert 0.0 <= held["after"]["pref_accuracy"] <= 1.0
    assert 0.0 <= held["after"]["reward_accuracy"] <= 1.0  # gain over the starting policy
    assert dpo["final"]["examples"] == 8.0 and "reward_accuracy" in dpo["final"]
    whens = [e["when"] for e in summary["evals"]]
    assert whens[:2] == ["before stage 1 (dpo)", "after stage 1 (dpo)"]
    assert whens[-1] == "after stage 2 (rloo)"
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    rl = [m for m in metrics if m["stage"] == "rloo2"]
    assert rl and all(m["turns_mean"] > 1.5 for m in rl)  # the environment's second turns
    ckpt = Path(dpo["checkpoint"]).parent
    assert len(json.loads((ckpt / "dpo1-prepared.json").read_text())) == 64  # cached refs
