"""The analyzer's figures from raw run records (no servers: the records are made here)."""

from __future__ import annotations

from typing import Any

from loadtest.analyzer import analyze
from loadtest.recorder import Recorder

T0 = 1_800_000_000.0


def _records(ramp: float, ramp_ms: float, load_ms: float, drain_ms: float) -> list[dict[str, Any]]:
    """A 10 s chat run of one worker: deliveries take ``ramp_ms`` during the ramp,
    ``load_ms`` at full load and ``drain_ms`` after the load stopped, 100 a second."""
    meta = {
        "kind": "meta", "label": "target", "run_id": "r1", "t": T0,
        "target": {"url": "ws://127.0.0.1:1/ws", "transport": "ws", "auth": "header",
                   "server_pid": None},
        "workers": 1, "duration": 10.0, "ramp": ramp, "drain": 2.0, "cpus": 2,
        "scenarios": {"chat": {"units": 1, "clients": 2, "weight": 1.0,
                               "headline": ["delivered", "send_deliver"]}},
        "options": {},
    }
    go = T0 + 1.0
    records: list[dict[str, Any]] = [meta, {"kind": "go", "t": go}]
    rec = Recorder(0)
    stats = rec.stats("chat")

    def second(t0: float, phase: str, ms: float) -> None:
        rec.phase = phase
        rec._t = t0
        for _ in range(100):
            stats.count("delivered")
            stats.latency("send_deliver", ms * 1000)
        snap = rec.snapshot()
        snap.update(t0=t0, t1=t0 + 1.0, cpu=0.3)
        records.append({"kind": "snap", **snap})

    for i in range(10):
        second(go + i, "run", ramp_ms if i < ramp else load_ms)
    records.append({"kind": "phase", "worker": 0, "phase": "drain", "t": go + 10.0})
    second(go + 10.0, "drain", drain_ms)
    records.append({"kind": "phase", "worker": 0, "phase": "close", "t": go + 11.0})
    return records


def test_headline_latency_is_measured_at_full_load_only() -> None:
    # Ramp seconds answered fast (light load), the drain's last deliveries fast too: the
    # headline is what a user meets at full load, as the steady rate is.
    report = analyze(_records(ramp=2.0, ramp_ms=5.0, load_ms=40.0, drain_ms=1.0))
    chat = report["scenarios"]["chat"]
    head = chat["headline"]
    assert head["steady_latency_ms"]["count"] == 800
    assert head["steady_latency_ms"]["min"] == 40.0  # no ramp or drain sample in it
    assert chat["steady_latency_ms"]["send_deliver"]["count"] == 800
    # Every sample is still in the whole-run figures.
    assert head["latency_ms"]["count"] == 1100
    assert chat["latency_ms"]["send_deliver"]["min"] == 1.0
    assert head["steady_per_s"] == 100.0


def test_without_a_ramp_the_headline_covers_the_run_but_not_the_drain() -> None:
    report = analyze(_records(ramp=0.0, ramp_ms=0.0, load_ms=40.0, drain_ms=1.0))
    head = report["scenarios"]["chat"]["headline"]
    assert head["steady_latency_ms"]["count"] == 1000
    assert head["steady_latency_ms"]["min"] == 40.0


def test_machine_speed_before_and_after_the_run() -> None:
    records = _records(ramp=0.0, ramp_ms=0.0, load_ms=40.0, drain_ms=1.0)
    assert analyze(records)["machine"]["cpu_speed_ms"] is None  # a run that took none
    records.insert(1, {"kind": "speed", "t": T0 + 0.5, "ms": 1.6})
    records.append({"kind": "speed", "t": T0 + 12.5, "ms": 2.4})
    assert analyze(records)["machine"]["cpu_speed_ms"] == {"before": 1.6, "after": 2.4}
