"""Start real service processes for tests (by PID; stopped by PID)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from verifier.launch import free_port, stop_process, verifier_process, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["ROOT", "free_port", "stop_process", "verifier_server", "wait_healthy"]


@contextmanager
def verifier_server(tmp: Path, config: dict[str, Any] | None = None,
                    env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A real `python -m verifier` process on loopback (2 workers unless configured)."""
    with verifier_process(tmp, {"workers": 2, **(config or {})}, env) as srv:
        yield srv
