"""Start a verifier service as a child process (the embedded default, tests, benchmarks)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from nebula.service_process import free_port, service_process, stop_process, wait_healthy

__all__ = ["free_port", "stop_process", "verifier_process", "wait_healthy"]


@contextmanager
def verifier_process(work_dir: Path, config: dict[str, Any] | None = None,
                     env: dict[str, str] | None = None,
                     supervise: bool | dict[str, Any] = False) -> Iterator[dict[str, Any]]:
    """A `python -m verifier` child on loopback with a metrics port unless configured.
    `supervise` (True or Supervisor options): restarted on the same ports when it dies
    (`nebula.service_process.service_process`)."""
    cfg = {"metrics_port": free_port(), **(config or {})}
    with service_process("verifier", work_dir, cfg, env, timeout_s=90.0,
                         supervise=supervise) as srv:
        yield srv
