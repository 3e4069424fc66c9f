"""Deterministic fault injection, for recovery tests and chaos drills.

`NEBULA_FAULTS` lists crash sites as `site@n` (comma-separated): the n-th time a process
passes `maybe_crash(site)` it exits at once with status 137, as a SIGKILL or an OOM kill would
leave it (no cleanup, no exception handlers). A test names the exact point to die at instead
of racing a killer thread against the job. The runner hands the variable to every actor it
starts; a restarted actor passes `armed=False` so the drill kills each actor once.
"""

from __future__ import annotations

import os

ENV = "NEBULA_FAULTS"
_passes: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """`"rollout-0.after_generate@2,learner.after_step"` -> {site: pass to die at (1 if
    no @n)}; a malformed entry is an error that names it."""
    out: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        site, _, n = entry.partition("@")
        if not site or (n and not n.isdigit()) or n == "0":
            raise ValueError(f"{ENV}: bad entry {entry!r}; expected site or site@n with n >= 1")
        out[site] = int(n or 1)
    return out


def maybe_crash(site: str, armed: bool = True) -> None:
    spec = os.environ.get(ENV)
    if not spec or not armed:
        return
    want = parse(spec).get(site)
    if want is None:
        return
    _passes[site] = _passes.get(site, 0) + 1
    if _passes[site] == want:
        os._exit(137)
