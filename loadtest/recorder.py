"""Per-worker recording: interval HdrHistograms and counters, no locks, no per-message logs.

Each scenario records into its own ``Stats`` (so two scenarios in a mix never mix their
counters and no name is prefixed on the hot path); the worker's own health (event-loop lag)
goes to ``Recorder.gen``. Once a second the interval is encoded into a compact snapshot
(histograms in HdrHistogram's base64 form) for the analyzer, which adds intervals up.
Latencies are in microseconds.
"""

from __future__ import annotations

import ctypes
import resource
import sys
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


# hdrh's record_value is pure Python at ~3 us a value (two values a chat message) and its
# reset() zeroes the 18,432 counters one by one (~2 ms a histogram, once a second, stalling
# the worker's loop mid-measurement). record() and clear() below do the same to the same
# counters at a fraction of the cost; tests/loadtest/test_recorder.py checks that the encoded
# histograms are identical. The index arithmetic is hdrh's, with LOWEST_US = 1 (unit
# magnitude 0): value v lands in bucket b = bit_length(v | mask) - (half magnitude + 1), at
# counter ((b + 1) << half magnitude) + (v >> b) - half count.
_H = new_histogram()
assert _H.unit_magnitude == 0, "record() assumes LOWEST_US == 1"
_MASK = _H.sub_bucket_mask
_HALF_MAG = _H.sub_bucket_half_count_magnitude
_HALF_COUNT = _H.sub_bucket_half_count
del _H


def record(h: HdrHistogram, value: int) -> None:
    """Record ``value`` (clamped into [LOWEST_US, HIGHEST_US]) into ``h``: what
    ``h.record_value`` does, without its per-call overhead."""
    if value < LOWEST_US:
        value = LOWEST_US
    elif value > HIGHEST_US:  # hdrh would drop it silently, hiding an outlier
        value = HIGHEST_US
    b = (value | _MASK).bit_length() - _HALF_MAG - 1
    h.counts[((b + 1) << _HALF_MAG) + (value >> b) - _HALF_COUNT] += 1
    h.total_count += 1
    if value < h.min_value:
        h.min_value = value
    if value > h.max_value:
        h.max_value = value


def clear(h: HdrHistogram) -> None:
    """``h.reset()`` with the counters zeroed in one memset."""
    ctypes.memset(ctypes.addressof(h.counts), 0, ctypes.sizeof(h.counts))
    h.total_count = 0
    h.min_value = sys.maxsize
    h.max_value = 0
    h.start_time_stamp_msec = sys.maxsize
    h.end_time_stamp_msec = 0


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
        record(h, int(micros))

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
            clear(h)
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
