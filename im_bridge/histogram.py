"""Histograms kept as plain numbers: a list of counts per bucket, cheap to bump on a hot
path (prometheus_client's own take a lock and walk their buckets on every update).
signaling/metrics.py exposes them."""

from __future__ import annotations

import bisect

# Upper bounds in seconds (Prometheus "le"); one more bucket, +Inf, follows.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def new_row() -> list[float]:
    """An empty histogram row: a count per bucket, then +Inf's, then the sum observed."""
    return [0.0] * (len(BUCKETS) + 2)


def observe(row: list[float], seconds: float) -> None:
    """Count ``seconds`` into ``row``."""
    row[bisect.bisect_left(BUCKETS, seconds)] += 1
    row[-1] += seconds
