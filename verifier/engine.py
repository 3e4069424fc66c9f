"""Verifies batches of items: deadlines, per-item errors, dispatch to pool or event loop.

Transport-free on purpose: the gRPC servicer and `nebula verify --local` both use it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from nebula.config import VerifierServiceConfig
from nebula.clients.verifier import ERROR, OK, TIMEOUT, Item, ItemResult  # noqa: F401
from verifier import metrics
from verifier.api import AsyncVerifier, Outcome, VerifierInputError, VerifyInput
from verifier.pool import DeadlineExceeded, ProcessWorkerPool, TaskError, WorkerCrashed
from verifier.registry import Registry
from verifier.worker import init_worker, run_sync_verifier



class UnknownVerifierError(KeyError):
    def __init__(self, unknown: list[str], available: list[str]) -> None:
        super().__init__(
            f"unknown verifier(s) {', '.join(map(repr, unknown))}; "
            f"available: {', '.join(available)}"
        )
        self.unknown, self.available = unknown, available

    def __str__(self) -> str:
        return self.args[0]


class BatchTooLargeError(ValueError):
    pass


def _metadata(raw: dict[str, Any] | str | None) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise VerifierInputError(f"metadata is not valid JSON: {e.msg} at char {e.pos}") from e
    if not isinstance(raw, dict):
        raise VerifierInputError(f"metadata must be a JSON object, got {type(raw).__name__}")
    return raw


class VerifierEngine:
    def __init__(self, config: VerifierServiceConfig, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry(config)
        self.pool = ProcessWorkerPool(
            config.workers, init=init_worker, init_args=(config.model_dump_json(),)
        )
        self._restarts_seen = 0
        self._kinds: dict[str, tuple[bool, str]] = {}  # name -> (is_async, version)

    def _kind(self, name: str) -> tuple[bool, str]:
        """Whether a verifier runs on the loop, and its version; looked up once per name."""
        kind = self._kinds.get(name)
        if kind is None:
            entry = self.registry.entries[name]
            version = "remote" if entry.remote else entry.load_class().version
            kind = self._kinds[name] = (self.registry.is_async(name), version)
        return kind

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()
        await self.registry.aclose()

    def check(self, items: list[Item]) -> None:
        """Batch-level validation: raises before any work starts."""
        if len(items) > self.config.max_batch_items:
            raise BatchTooLargeError(
                f"batch has {len(items)} items; max_batch_items is {self.config.max_batch_items}"
            )
        unknown = sorted({i.verifier for i in items} - set(self.registry.entries))
        if unknown:
            raise UnknownVerifierError(unknown, self.registry.names())

    async def verify_batch(self, items: list[Item], item_timeout_s: float = 0) -> list[ItemResult]:
        self.check(items)
        timeout = item_timeout_s if item_timeout_s > 0 else self.config.item_timeout_s
        t0 = time.monotonic()
        results = await asyncio.gather(*(self._one(i, t0, timeout) for i in items))
        restarts = self.pool.restarts - self._restarts_seen
        if restarts:
            metrics.WORKER_RESTARTS.inc(restarts)
            self._restarts_seen = self.pool.restarts
        return list(results)

    async def _one(self, item: Item, t0: float, timeout: float) -> ItemResult:
        res = ItemResult(id=item.id, verifier=item.verifier, status=ERROR)
        try:
            is_async, res.verifier_version = self._kind(item.verifier)
            outcome = await self._run(item, t0 + timeout, is_async)
            res.status = OK
            res.reward, res.passed = float(outcome.reward), bool(outcome.passed)
            res.reason, res.details = outcome.reason, outcome.details
            if not math.isfinite(res.reward):
                res.status, res.reward, res.reason = ERROR, 0.0, "verifier returned a non-finite reward"
            violation = outcome.details.get("violation") if outcome.details else None
            if violation:
                metrics.SANDBOX_VIOLATIONS.labels(str(violation)).inc()
        except (DeadlineExceeded, TimeoutError):
            res.status, res.reason = TIMEOUT, f"deadline of {timeout:.3g}s exceeded"
            metrics.TIMEOUTS.labels(item.verifier).inc()
        except TaskError as e:
            res.reason = str(e) if e.type_name == "VerifierInputError" else f"{e.type_name}: {e}"
        except (VerifierInputError, WorkerCrashed) as e:
            res.reason = str(e)
        except Exception as e:  # noqa: BLE001 - one item's failure never fails the batch
            res.reason = f"{type(e).__name__}: {e}"
        res.elapsed_s = time.monotonic() - t0
        metrics.ITEMS.labels(item.verifier, res.status).inc()
        metrics.ITEM_LATENCY.labels(item.verifier).observe(res.elapsed_s)
        return res

    async def _run(self, item: Item, deadline: float, is_async: bool) -> Outcome:
        if not isinstance(item.response, str):
            raise VerifierInputError("response must be a string")
        if len(item.response) > self.config.max_response_chars:
            raise VerifierInputError(
                f"response has {len(item.response)} chars; "
                f"max_response_chars is {self.config.max_response_chars}"
            )
        metadata = _metadata(item.metadata)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the item started")
        if is_async:
            verifier = self.registry.get(item.verifier)
            assert isinstance(verifier, AsyncVerifier)
            inp = VerifyInput(item.response, item.reference or "", metadata)
            # A small grace lets the verifier report its own timeout reason first.
            return await asyncio.wait_for(verifier.averify(inp, remaining), remaining + 0.5)
        return await self.pool.run(
            run_sync_verifier, (item.verifier, item.response, item.reference or "", metadata),
            remaining,
        )
