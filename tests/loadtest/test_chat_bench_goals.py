"""bench/chat_bench.py judges the core issue's goals on what each run measured."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chat_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chat_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(server: str, rate: float, p99s: list[float]) -> dict[str, Any]:
    """A median row as run_chat builds it (its own p99 is one of the rounds')."""
    return {"server": server, "steady_msgs_per_s": rate, "p99_ms": sorted(p99s)[1],
            "runs_p99_ms": p99s}


def verdicts(goals: list[dict[str, Any]]) -> dict[str, bool]:
    return {g["what"]: g["met"] for g in goals}


def test_one_slow_round_fails_the_p99_goal(bench: ModuleType) -> None:
    rows = [
        row("talkbridge-sqlite", 24_508, [49.0, 48.8, 50.8]),
        row("bare", 49_572, [26.1, 27.2, 27.2]),
        row("socketio", 3_583, [336.6, 313.1, 287.5]),
    ]
    got = verdicts(bench.targets(rows, None))
    assert got == {
        "talkbridge-sqlite msgs/s": True,
        "talkbridge-sqlite p99 ms, worst round": False,  # 50.8 in one round of three
        "talkbridge-sqlite / socketio": True,
        "talkbridge-sqlite / bare": True,
    }
    rows[0]["runs_p99_ms"] = [49.0, 48.8, 49.9]
    assert verdicts(bench.targets(rows, None))["talkbridge-sqlite p99 ms, worst round"]


def test_rates_and_ratios_against_their_goals(bench: ModuleType) -> None:
    rows = [
        row("talkbridge-sqlite", 9_999, [40.0, 41.0, 42.0]),
        row("bare", 25_000, [20.0, 21.0, 22.0]),  # 9,999 / 25,000 = 0.39996
        row("socketio", 6_667, [300.0, 310.0, 320.0]),  # x1.49977
    ]
    got = verdicts(bench.targets(rows, None))
    assert got["talkbridge-sqlite msgs/s"] is False
    assert got["talkbridge-sqlite / bare"] is False
    assert got["talkbridge-sqlite / socketio"] is False
    assert got["talkbridge-sqlite p99 ms, worst round"] is True


def test_idle_connections_goal_needs_ten_thousand_held(bench: ModuleType) -> None:
    idle = {"rss_per_connection_kb": 18.9, "held": 10_000, "ok": True}

    def met(**change: Any) -> bool:
        (goal,) = bench.targets([], {**idle, **change})
        return bool(goal["met"])

    assert met()
    assert not met(ok=False)  # some connections failed or dropped
    assert not met(rss_per_connection_kb=50.1)
    assert not met(held=200)  # fewer connections: not the goal's condition


def test_servers_not_run_are_not_judged(bench: ModuleType) -> None:
    assert bench.targets([row("bare", 40_000, [30.0, 31.0, 32.0])], None) == []


def test_closed_loop_note_sets_the_rate_against_the_p99_goal(bench: ModuleType) -> None:
    rows = [row("talkbridge-sqlite", 16_000, [50.0, 52.0, 55.0]), row("bare", 32_000, [1.0] * 3)]
    note = bench.closed_loop_note(rows, 800)
    assert "800 messages in flight / 16,000 msgs/s = 50.0 ms" in note
    assert "needs more than 16,000 msgs/s" in note
    assert bench.closed_loop_note(rows[1:], 800) is None
