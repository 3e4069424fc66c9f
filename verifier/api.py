"""The verifier interface that built-ins, plug-ins and remote verifiers implement.

Two kinds:
- `Verifier`: CPU-bound and synchronous. The service runs it inside a worker process of its
  pool, so it may block, use signals, or hang: the pool enforces the item's deadline by
  killing the worker. Plug-ins are normally of this kind.
- `AsyncVerifier`: I/O-bound, runs on the service's event loop (the code sandbox waits on a
  subprocess, a remote verifier waits on gRPC). It must honour the deadline it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nebula.config import VerifierServiceConfig


class VerifierInputError(ValueError):
    """The item is malformed for this verifier (missing/invalid field); names the field."""


@dataclass
class VerifyInput:
    response: str
    reference: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a verifier says of one item. reward is in [0, 1] for the built-ins."""

    reward: float
    passed: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class _Base(ABC):
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""

    def __init__(self, config: VerifierServiceConfig | None = None) -> None:
        self.config = config or VerifierServiceConfig()


class Verifier(_Base):
    """Synchronous, CPU-bound; runs in a pool worker process."""

    @abstractmethod
    def verify(self, item: VerifyInput) -> Outcome: ...


class AsyncVerifier(_Base):
    """Runs on the service's event loop; must return before `timeout_s` elapses."""

    @abstractmethod
    async def averify(self, item: VerifyInput, timeout_s: float) -> Outcome: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (channels, sandboxes) when the service stops."""
