"""Deterministic fault injection, for recovery tests and chaos drills.

`NEBULA_FAULTS` lists fault sites as `site@n` (comma-separated): the n-th time a process
passes `maybe_crash(site)` it exits at once with status 137, as a SIGKILL or an OOM kill would
leave it (no cleanup, no exception handlers); at `maybe_raise(site)` it raises
`InjectedFault` instead, as a bug or a lost connection would. A test names the exact point to die at instead
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


class InjectedFault(RuntimeError):
    """The error a `maybe_raise` site raises."""


def _due(site: str, armed: bool) -> bool:
    spec = os.environ.get(ENV)
    if not spec or not armed:
        return False
    want = parse(spec).get(site)
    if want is None:
        return False
    _passes[site] = _passes.get(site, 0) + 1
    return _passes[site] == want


def maybe_crash(site: str, armed: bool = True) -> None:
    if _due(site, armed):
        os._exit(137)


def maybe_raise(site: str, armed: bool = True) -> None:
    if _due(site, armed):
        raise InjectedFault(f"injected fault at {site} ({ENV})")


def reached(site: str, value: int) -> bool:
    """True once, the first time `value` (e.g. a learner step the driver observed) is at
    least the site's n: for drills keyed to progress rather than to passes."""
    spec = os.environ.get(ENV)
    if not spec or site in _passes:
        return False
    want = parse(spec).get(site)
    if want is None or value < want:
        return False
    _passes[site] = 1
    return True
