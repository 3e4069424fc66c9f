"""The `nebula` CLI: verify a JSONL file through a server and in-process; what relative
paths in a submitted job mean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from procs import ROOT

NEBULA = [sys.executable, "-m", "services"]


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(NEBULA + args, cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def write_items(path: Path) -> Path:
    rows = [
        {"verifier": "math", "response": "\\boxed{2}", "reference": "2", "id": "a"},
        "this line is not json",
        {"verifier": "nope", "response": "x"},
        {"verifier": "exact", "reference": "x"},
        {"verifier": "exact", "response": "Hi", "reference": "hi",
         "metadata": {"ignore_case": True}},
    ]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    return path


def check_output(stdout: str) -> None:
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 5
    assert rows[0]["id"] == "a" and rows[0]["passed"] is True
    assert rows[1]["status"] == "error" and "line 2: not valid JSON" in rows[1]["reason"]
    assert "unknown verifier 'nope'" in rows[2]["reason"] and "math" in rows[2]["reason"]
    assert "'response' is missing" in rows[3]["reason"]
    assert rows[4]["passed"] is True


def test_verify_through_server(verifier_service: dict[str, Any], tmp_path: Path) -> None:
    out = run(["verify", "--address", verifier_service["address"],
               str(write_items(tmp_path / "items.jsonl"))])
    assert out.returncode == 0, out.stderr
    check_output(out.stdout)


def test_verify_local(tmp_path: Path) -> None:
    out = run(["verify", "--local", str(write_items(tmp_path / "items.jsonl"))])
    assert out.returncode == 0, out.stderr
    check_output(out.stdout)


def test_usage_errors(tmp_path: Path) -> None:
    out = run(["verify", str(tmp_path / "missing.jsonl"), "--local"])
    assert out.returncode == 2 and "file not found" in out.stderr
    out = run(["verify", str(write_items(tmp_path / "i.jsonl"))])
    assert out.returncode == 2 and "--address" in out.stderr
    out = run(["verify", "--address", "127.0.0.1:1", str(tmp_path / "i.jsonl")])
    assert out.returncode == 2 and "UNAVAILABLE" in out.stderr
    out = run(["verifier", "serve", "--port", "99999"])
    assert out.returncode == 2 and "port" in out.stderr


def test_submitted_relative_paths_mean_the_submitters_and_the_api_refuses_them(
        tmp_path: Path) -> None:
    """`nebula submit` resolves relative input paths against its working directory (what
    `nebula run` reads there); the service refuses a relative input path with the field named,
    and leaves output locations to itself."""
    from nebula.config import ConfigError
    from services.jobs.service import validate_job_config
    from services.sdk import resolve_paths

    raw = {"model": {"path": "ckpt/m"}, "output_dir": "out",
           "datasets": {"train": [{"path": "data/a.jsonl"}, {"path": "/abs/b.jsonl"}]},
           "stages": [{"type": "dpo", "dataset": {"path": "pref.jsonl"}}]}
    with pytest.raises(ConfigError) as e:
        validate_job_config(raw, "j1", tmp_path)
    fields = sorted(x["field"] for x in e.value.errors)
    assert fields == ["datasets.train.0.path", "model.path", "stages.0.dataset.path"]
    fixed = resolve_paths(raw, tmp_path / "here")
    assert fixed["model"]["path"] == str(tmp_path / "here/ckpt/m")
    assert fixed["datasets"]["train"][1]["path"] == "/abs/b.jsonl"
    assert fixed["stages"][0]["dataset"]["path"] == str(tmp_path / "here/pref.jsonl")
    assert fixed["output_dir"] == "out" and raw["model"]["path"] == "ckpt/m"
    stored = validate_job_config(fixed, "j1", tmp_path)
    assert stored["output_dir"] == str(tmp_path / "out")
