"""Prometheus metrics of the BatchProcessor (default registry, labelled by processor name; /metrics exposes them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LABEL = ["processor"]
QUEUE_DEPTH = Gauge("batcher_queue_items", "Items waiting in the batch queue", _LABEL)
QUEUE_TOKENS = Gauge("batcher_queue_tokens", "Tokens (item costs) waiting in the batch queue", _LABEL)
BATCH_SIZE = Histogram(
    "batcher_batch_size", "Items per forward batch", _LABEL, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
BATCH_TOKENS = Histogram(
    "batcher_batch_tokens",
    "Padded tokens per forward batch",
    _LABEL,
    buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
)
PADDING_RATIO = Histogram(
    "batcher_padding_ratio", "Padded tokens / real tokens per batch", _LABEL, buckets=(1.0, 1.05, 1.1, 1.25, 1.5, 2, 4)
)
FORWARD_SECONDS = Histogram(
    "batcher_forward_seconds",
    "Seconds per forward pass (device thread)",
    _LABEL,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FAILURES = Counter("batcher_failures_total", "Failed batches and items, by reason", ["processor", "reason"])
CANCELLED = Counter("batcher_cancelled_items_total", "Items dropped because their request was cancelled", _LABEL)
REJECTED = Counter("batcher_rejected_requests_total", "Requests refused because the queue was full", _LABEL)
