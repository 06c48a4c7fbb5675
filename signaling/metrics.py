"""Prometheus metrics of one node (a registry per app, so tests can run several apps)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The counters and histograms /metrics exposes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge(
            "talkbridge_connections", "Open authenticated WebSockets", registry=r
        )
        self.frames_in = Counter("talkbridge_frames_in", "Frames received", ["type"], registry=r)
        self.errors = Counter("talkbridge_errors", "Error replies sent", ["code"], registry=r)
        self.auth_failures = Counter(
            "talkbridge_auth_failures", "Refused authentications", registry=r
        )
        self.messages = Counter(
            "talkbridge_messages_stored", "Messages stored", ["kind"], registry=r
        )
        self.request_seconds = Histogram(
            "talkbridge_request_seconds",
            "Time from request to reply",
            ["type"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.store_batches = Gauge("talkbridge_store_batches", "Group-commit batches", registry=r)
        self.store_ops = Gauge("talkbridge_store_ops", "Ops committed in batches", registry=r)
        # labels() costs a lock and a tuple hash per call; keep the children per label.
        self._children: dict[tuple[int, str], Any] = {}

    def _child(self, metric: Any, label: str) -> Any:
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def message_stored(self, kind: str) -> None:
        """Count a stored message of ``kind``."""
        self._child(self.messages, kind).inc()

    def frame_in(self, ftype: str) -> None:
        """Count a received request frame of a known type."""
        self._child(self.frames_in, ftype).inc()

    def request_done(self, ftype: str, seconds: float) -> None:
        """Record the time a request of a known type took to its reply."""
        self._child(self.request_seconds, ftype).observe(seconds)
