"""Prometheus metrics of a worker (the ``prometheus-client`` package).

Each :class:`WorkerMetrics` has its own registry, so that two workers in one process (or a
test) never share counters; :meth:`WorkerMetrics.serve` exposes it over HTTP, on
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from ._budgets import Budgets

logger = logging.getLogger(__name__)

# End-to-end seconds (enqueue to result): from a small object on loopback to a 100 GB one.
_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 10800)
# Admission waits: none at all is the common case, minutes behind a big object the worst.
_WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class WorkerMetrics:
    """The worker's counters, gauges and histograms (names start with ``fastpipe_``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.objects = Counter(
            "fastpipe_objects", "Objects finished, by outcome", ["outcome"], registry=r
        )
        self.bytes = Counter("fastpipe_bytes", "Bytes fetched from S3", registry=r)
        self.seconds = Histogram(
            "fastpipe_object_seconds",
            "End-to-end seconds per object (enqueue to result when SQS says when it was sent)",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        # The time model's prediction against what happened: report.predicted_seconds and
        # report.seconds (processing, HEAD to report), and their ratio per object.
        self.predicted = Histogram(
            "fastpipe_predicted_seconds",
            "The engine's end-to-end prediction per object, made before its first byte",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.prediction_ratio = Histogram(
            "fastpipe_prediction_ratio",
            "Predicted over actual processing seconds per object (1 is exact)",
            buckets=(0.5, 0.67, 0.8, 0.9, 0.95, 1.05, 1.1, 1.25, 1.5, 2, 4),
            registry=r,
        )
        self.in_flight = Gauge("fastpipe_objects_in_flight", "Objects being processed", registry=r)
        self.messages = Counter(
            "fastpipe_messages",
            "Queue messages by what happened to them: received, deleted, released, "
            "skipped (test events, removals, duplicates), left (for redrive)",
            ["action"],
            registry=r,
        )
        self.retries = Counter("fastpipe_retries", "Part retries during downloads", registry=r)
        self.admission = Histogram(
            "fastpipe_admission_seconds",
            "Seconds each object waited for admission (the engine's object slots and disk "
            "budget; report.queued_seconds)",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.disk_used = Gauge(
            "fastpipe_disk_budget_used_bytes", "Bytes of the disk budget in use", registry=r
        )
        self.disk_budget = Gauge(
            "fastpipe_disk_budget_bytes", "The engine's disk budget for temp files", registry=r
        )
        for action in ("received", "deleted", "released", "skipped", "left"):
            self.messages.labels(action)
        self._server: Any = None
        self.port: int | None = None

    def track(self, budgets: Budgets) -> None:
        """Report ``budgets``' disk use (read at each scrape, from the server's thread: an
        int read, no lock needed)."""
        disk = budgets.disk
        self.disk_used.set_function(lambda: float(disk.used))
        self.disk_budget.set(disk.capacity)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (0: a free port) in a thread; return the port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        self.port = int(server.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", addr, self.port)
        return self.port

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
