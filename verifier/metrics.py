"""Prometheus metrics of the verifier service (served on metrics_port by nebula.grpc_host)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("nebula_verifier_requests_total", "VerifyBatch calls", ["code"])
ITEMS = Counter("nebula_verifier_items_total", "Items verified", ["verifier", "status"])
ITEM_LATENCY = Histogram(
    "nebula_verifier_item_latency_seconds",
    "Seconds from batch arrival to an item's verdict",
    ["verifier"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_LATENCY = Histogram(
    "nebula_verifier_batch_latency_seconds",
    "Seconds to answer a VerifyBatch call",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TIMEOUTS = Counter("nebula_verifier_timeouts_total", "Items that passed their deadline", ["verifier"])
SANDBOX_VIOLATIONS = Counter(
    "nebula_verifier_sandbox_violations_total", "Sandboxed runs stopped by a limit", ["violation"]
)
WORKER_RESTARTS = Counter("nebula_verifier_worker_restarts_total", "Pool workers killed and replaced")

