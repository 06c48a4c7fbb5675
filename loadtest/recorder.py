"""Per-worker recording: interval HdrHistograms and counters, no locks, no per-message logs.

Each scenario records into its own ``Stats`` (so two scenarios in a mix never mix their
counters and no name is prefixed on the hot path); the worker's own health (event-loop lag)
goes to ``Recorder.gen``. Once a second the interval is encoded into a compact snapshot
(histograms in HdrHistogram's base64 form) for the analyzer, which adds intervals up.
Latencies are in microseconds.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000  # two minutes: anything slower is recorded at this value
SIGFIGS = 3


def new_histogram() -> HdrHistogram:
    """An empty latency histogram in microseconds."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGFIGS)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Stats:
    """Counters, errors by code and latency histograms of one scenario in one worker."""

    def __init__(self) -> None:
        self.hists: dict[str, HdrHistogram] = {}
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.in_flight = 0  # gauge, kept by scenarios that have a window

    def latency(self, name: str, micros: float) -> None:
        """Record one latency sample in microseconds."""
        h = self.hists.get(name)
        if h is None:
            h = self.hists[name] = new_histogram()
        # Clamp: hdrh silently drops values outside its range, which would hide outliers.
        h.record_value(min(max(int(micros), LOWEST_US), HIGHEST_US))

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        self.counts[name] += n

    def error(self, code: str, n: int = 1) -> None:
        """Count an error by its code (never swallowed)."""
        self.errors[code] += n

    def take(self) -> dict[str, Any]:
        """Encode and reset this interval."""
        out = {
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "in_flight": self.in_flight,
            "hists": {
                k: h.encode().decode("ascii") for k, h in self.hists.items() if h.get_total_count()
            },
        }
        for h in self.hists.values():
            h.reset()
        self.counts.clear()
        self.errors.clear()
        return out


class Recorder:
    """What one worker measured in the current interval."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.scenarios: dict[str, Stats] = {}
        self.gen = Stats()
        self.connections = 0  # gauge: open right now, all scenarios
        self.phase = "setup"
        self._t = time.time()
        self._cpu = _cpu()

    def stats(self, scenario: str) -> Stats:
        """The Stats a scenario records into."""
        s = self.scenarios.get(scenario)
        if s is None:
            s = self.scenarios[scenario] = Stats()
        return s

    def snapshot(self) -> dict[str, Any]:
        """Encode and reset the interval: what the analyzer receives once a second."""
        now = time.time()
        cpu = _cpu()
        span = max(now - self._t, 1e-6)
        snap = {
            "worker": self.worker,
            "t0": self._t,
            "t1": now,
            "phase": self.phase,
            "cpu": (cpu - self._cpu) / span,  # fraction of one core
            "connections": self.connections,
            "generator": self.gen.take(),
            "scenarios": {name: s.take() for name, s in self.scenarios.items()},
        }
        self._t, self._cpu = now, cpu
        return snap
