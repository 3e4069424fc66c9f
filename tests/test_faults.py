"""The fault drill: NEBULA_FAULTS names where a process dies, and it dies exactly there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nebula.faults import parse
from procs import ROOT


def test_parse_names_the_bad_entry() -> None:
    assert parse("rollout-0.after_generate@2, learner.after_step") == {
        "rollout-0.after_generate": 2, "learner.after_step": 1}
    for bad in ("x@0", "x@two", "@3"):
        with pytest.raises(ValueError, match=f"NEBULA_FAULTS: bad entry '{bad}'"):
            parse(bad)


def test_the_process_exits_137_at_the_named_pass_only_when_armed() -> None:
    code = ("from nebula.faults import maybe_crash\n"
            "for i in range(1, 5):\n"
            "    maybe_crash('site', armed=False)\n"
            "    print(i, flush=True)\n"
            "    maybe_crash('site')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"NEBULA_FAULTS": "other,site@3", "PYTHONPATH": str(ROOT)})
    assert p.returncode == 137 and p.stdout.split() == ["1", "2", "3"]


def test_raise_site_raises_once_at_the_named_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from nebula.faults import InjectedFault, maybe_raise

    monkeypatch.setenv("NEBULA_FAULTS", "unit.raise_site@2")
    maybe_raise("unit.raise_site")
    with pytest.raises(InjectedFault, match="unit.raise_site"):
        maybe_raise("unit.raise_site")
    maybe_raise("unit.raise_site")  # once only: the site passes from then on
