"""Prometheus metrics of one service instance (its own registry: no process-wide state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Seconds: a toy encoder answers in microseconds, a scan over millions of rows in seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Request counts by route and status, per-stage latency histograms, batch sizes and the
    batcher's queue depth.

    Args:
        queue_depth: Reads the number of queries waiting for a batch.

    Example:
        >>> m = Metrics(lambda: 0)
        >>> m.request("/healthz", "GET", 200, 0.001)
        >>> b"quari_requests_total" in m.render()
        True
    """

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "quari_requests",
            "HTTP requests answered, by route template, method and status code.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "quari_request_seconds",
            "Time from a request's first byte to its response, by route template.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "quari_stage_seconds",
            "Search time per stage (queue, encode, adapt, candidates, rescore, metadata).",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batches = Histogram(
            "quari_batch_size",
            "Queries per micro-batch.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge(
            "quari_queue_depth", "Queries waiting for a micro-batch.", registry=self.registry
        )
        self.queue.set_function(queue_depth)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Counts one answered request."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def search(self, timings: dict[str, float]) -> None:
        """Records one search's stage times (seconds)."""
        for stage, seconds in timings.items():
            self.stages.labels(stage).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
