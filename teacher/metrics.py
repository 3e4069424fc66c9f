"""Prometheus metrics of the teacher service (served over HTTP on metrics_port)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("nebula_teacher_requests_total", "TeacherLogprobs calls", ["teacher", "code"])
SEQUENCES = Counter("nebula_teacher_sequences_total", "Sequences scored", ["teacher", "source"])
TOKENS = Counter("nebula_teacher_tokens_total", "Completion tokens scored", ["teacher", "source"])
CACHE = Counter("nebula_teacher_cache_total", "Cache look-ups of sequences", ["teacher", "result"])
BATCHES = Counter("nebula_teacher_batches_total", "Dynamic batches (batching windows) run",
                  ["teacher"])
MERGED_BATCHES = Counter("nebula_teacher_merged_batches_total",
                         "Dynamic batches that merged sequences of two or more requests",
                         ["teacher"])
FORWARDS = Counter("nebula_teacher_forward_passes_total", "Model forward passes", ["teacher"])
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_REQUESTS = Histogram("nebula_teacher_batch_requests", "Requests merged into one batch",
                           ["teacher"], buckets=_SIZES)
BATCH_SEQUENCES = Histogram("nebula_teacher_batch_sequences", "Sequences in one batch",
                            ["teacher"], buckets=_SIZES)
BATCH_SECONDS = Histogram(
    "nebula_teacher_batch_seconds", "Seconds of forward compute of one batch", ["teacher"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REQUEST_LATENCY = Histogram(
    "nebula_teacher_request_latency_seconds", "Seconds to answer a TeacherLogprobs call",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

