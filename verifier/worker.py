"""Code that runs inside the verifier service's pool worker processes."""

from __future__ import annotations

import logging
from typing import Any

from nebula.config import VerifierServiceConfig
from verifier.api import Outcome, Verifier, VerifyInput
from verifier.registry import Registry

_registry: Registry | None = None


def init_worker(config_json: str) -> None:
    """Pool initializer: build this process's registry and warm the built-ins."""
    global _registry
    logging.basicConfig(level=logging.WARNING)
    _registry = Registry(VerifierServiceConfig.model_validate_json(config_json))
    for name in ("math",):  # importing math-verify's grammar takes a second; do it now
        _registry.get(name)


def run_sync_verifier(name: str, response: str, reference: str, metadata: dict[str, Any]) -> Outcome:
    assert _registry is not None, "init_worker was not called"
    verifier = _registry.get(name)
    assert isinstance(verifier, Verifier)
    return verifier.verify(VerifyInput(response, reference, metadata))
