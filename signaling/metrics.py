"""Prometheus metrics of one node (a registry per app, so tests can run several apps)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, utils
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from im_bridge.histogram import BUCKETS, new_row, observe

_go_float: Callable[[float], str] = utils.floatToGoString  # "le" spelled as Prometheus does
_LE = tuple(_go_float(b) for b in (*BUCKETS, float("inf")))
# How often the event loop's lag is sampled (see watch_loop_lag).
LAG_INTERVAL_S = 0.25


def _cumulative(row: list[float]) -> list[tuple[str, float]]:
    """A plain histogram row (see im_bridge/histogram.py) as the cumulative
    ``(le, count)`` pairs a Prometheus histogram exposes."""
    total, buckets = 0.0, []
    for le, seen in zip(_LE, row[:-1], strict=True):
        total += seen
        buckets.append((le, total))
    return buckets


class PerRequestStats(Collector):
    """The series bumped for every request, kept as plain numbers and turned into metric
    families only when scraped: prometheus_client's own take a lock (and a histogram walks
    its buckets) on every update, several microseconds per message on the hot path."""

    def __init__(self) -> None:
        self.frames_in: dict[str, int] = {}
        self.messages: dict[str, int] = {}
        # per request type: observations per bucket (the last one is +Inf), then the sum
        self.requests: dict[str, list[float]] = {}

    def observe(self, ftype: str, seconds: float) -> None:
        row = self.requests.get(ftype)
        if row is None:
            row = self.requests[ftype] = new_row()
        observe(row, seconds)

    def collect(self) -> Iterator[Metric]:
        frames = CounterMetricFamily("talkbridge_frames_in", "Frames received", labels=["type"])
        for ftype, n in list(self.frames_in.items()):
            frames.add_metric([ftype], n)
        stored = CounterMetricFamily(
            "talkbridge_messages_stored", "Messages stored", labels=["kind"]
        )
        for kind, n in list(self.messages.items()):
            stored.add_metric([kind], n)
        hist = HistogramMetricFamily(
            "talkbridge_request_seconds", "Time from request to reply", labels=["type"]
        )
        for ftype, row in list(self.requests.items()):
            hist.add_metric([ftype], _cumulative(row), row[-1])
        yield from (frames, stored, hist)


class RowHistogram(Collector):
    """One unlabelled histogram kept as a plain row (see im_bridge/histogram.py)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.row = new_row()

    def observe(self, seconds: float) -> None:
        observe(self.row, seconds)

    def collect(self) -> Iterator[Metric]:
        hist = HistogramMetricFamily(self.name, self.documentation)
        row = list(self.row)
        hist.add_metric([], _cumulative(row), row[-1])
        yield hist


async def watch_loop_lag(lag: RowHistogram, interval: float = LAG_INTERVAL_S) -> None:
    """Sample the running loop's lag into ``lag`` until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        lag.observe(max(0.0, loop.time() - due))


class Metrics:
    """The counters and histograms /metrics exposes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge(
            "talkbridge_connections", "Open authenticated WebSockets", registry=r
        )
        self.errors = Counter("talkbridge_errors", "Error replies sent", ["code"], registry=r)
        self.auth_failures = Counter(
            "talkbridge_auth_failures", "Refused authentications", registry=r
        )
        self.store_batches = Gauge("talkbridge_store_batches", "Group-commit batches", registry=r)
        self.store_ops = Gauge("talkbridge_store_ops", "Ops committed in batches", registry=r)
        self.store_pending = Gauge(
            "talkbridge_store_pending_ops", "Write ops waiting for the next group commit",
            registry=r,
        )
        self.per_request = PerRequestStats()
        r.register(self.per_request)
        # How late the event loop ran a timer: the wait every frame, reply and timer on
        # this node shares; it grows as the node nears saturation.
        self.loop_lag = RowHistogram(
            "talkbridge_event_loop_lag_seconds",
            f"How late the event loop ran a timer (sampled every {LAG_INTERVAL_S:g} s)",
        )
        r.register(self.loop_lag)
        # Copied from the store's counters at each scrape (see store_stats).
        self.store_batch_seconds = RowHistogram(
            "talkbridge_store_batch_seconds",
            "Time from a group-commit batch's start to its commit being durable",
        )
        r.register(self.store_batch_seconds)

    def store_stats(self, stats: dict[str, Any]) -> None:
        """Take the store's counters (Store.stats) into the series /metrics exposes."""
        self.store_batches.set(stats.get("batches", 0))
        self.store_ops.set(stats.get("ops", 0))
        self.store_pending.set(stats.get("pending", 0))
        row = stats.get("batch_seconds")
        if row is not None:
            self.store_batch_seconds.row = row  # Store.stats hands out a copy

    def message_stored(self, kind: str) -> None:
        """Count a stored message of ``kind``."""
        m = self.per_request.messages
        m[kind] = m.get(kind, 0) + 1

    def frame_in(self, ftype: str) -> None:
        """Count a received request frame of a known type."""
        f = self.per_request.frames_in
        f[ftype] = f.get(ftype, 0) + 1

    def request_done(self, ftype: str, seconds: float) -> None:
        """Record the time a request of a known type took to its reply."""
        self.per_request.observe(ftype, seconds)
