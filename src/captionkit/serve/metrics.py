"""What /metrics reports, in Prometheus' text format: requests, latency, batches, queue, images/s."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW = 60.0
"""Seconds over which the images/s gauge averages."""


class Metrics:
    """The server's counters, on a registry of its own (two apps in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("captionkit_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("captionkit_request_seconds", "Time from request to response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("captionkit_batch_size", "Images per model batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("captionkit_batch_seconds", "Time the model took per batch",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("captionkit_images", "Images the models have processed", ["model"],
                              registry=self.registry)
        self.queue_depth = Gauge("captionkit_queue_depth", "Images waiting for a model", ["model"],
                                 registry=self.registry)
        self.images_per_second = Gauge("captionkit_images_per_second",
                                       f"Images processed per second over the last {RATE_WINDOW:g} s",
                                       ["model"], registry=self.registry)
        self._done: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def watch(self, model: str, depth: Callable[[], int]) -> Callable[[int, float], None]:
        """Report a model worker's queue depth; returns the callback its batches report to."""
        self.queue_depth.labels(model).set_function(lambda: float(depth()))
        done = self._done.setdefault(model, deque())
        self.images_per_second.labels(model).set_function(lambda: self._rate(done))

        def on_batch(images: int, seconds: float) -> None:
            self.batch_size.labels(model).observe(images)
            self.batch_seconds.labels(model).observe(seconds)
            self.images.labels(model).inc(images)
            with self._lock:
                done.append((time.monotonic(), images))

        return on_batch

    def _rate(self, done: deque[tuple[float, int]]) -> float:
        now = time.monotonic()
        with self._lock:
            while done and done[0][0] < now - RATE_WINDOW:
                done.popleft()
            return sum(images for _, images in done) / RATE_WINDOW

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
