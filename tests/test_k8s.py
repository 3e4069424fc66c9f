"""k8s manifests validate offline against the Kubernetes schemas (strict: no unknown fields)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from procs import ROOT

MANIFESTS = sorted(p for p in (ROOT / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def _validator() -> str:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    return str(exe) if exe.exists() else (shutil.which("kubernetes-validate") or "")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    exe = _validator()
    assert exe, "kubernetes-validate is a dev dependency"
    out = subprocess.run([exe, "-k", "1.30", "--strict", str(path)], capture_output=True,
                         text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "WARN" not in text.upper() and "ERROR" not in text.upper(), text
    assert text.count("INFO") == len([d for d in yaml.safe_load_all(path.read_text()) if d])


def test_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in MANIFESTS)
