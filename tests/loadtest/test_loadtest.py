"""The load tester against real servers at small scale.

Each run's report must account for every message: what the tool says it sent, got acked and
saw delivered must match, and against talkbridge what the server stored must match too.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtest import servers
from loadtest.cli import build_parser, run_command
from loadtest.tokens import mint

REPO = Path(__file__).resolve().parents[2]
SECRET = secrets.token_hex(16)


def run(tmp_path: Path, *argv: str) -> dict[str, Any]:
    """Run ``talkbridge-load run ...`` in-process and return its report."""
    opts = build_parser().parse_args(
        ["run", *argv, "--secret", SECRET, "--out", str(tmp_path / "out"), "--quiet"]
    )
    return run_command(opts)


@pytest.fixture(scope="module")
def talkbridge() -> Iterator[servers.Server]:
    srv = servers.start_talkbridge(SECRET)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def bare() -> Iterator[servers.Server]:
    srv = servers.start_baseline("bare", SECRET)
    try:
        yield srv
    finally:
        srv.stop()


class Probe:
    """A plain WebSocket client that asks the server what it stored."""

    def __init__(self, url: str, user: str) -> None:
        self.url = url
        self.user = user
        self.n = 0

    async def __aenter__(self) -> Probe:
        self.session = aiohttp.ClientSession()
        token = mint(SECRET, self.user, "probe", 2_000_000_000)
        self.ws = await self.session.ws_connect(
            self.url, headers={"Authorization": f"Bearer {token}"}
        )
        first = await self.ws.receive_json(timeout=10)
        assert first["type"] == "auth.ok", first
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.ws.close()
        await self.session.close()

    async def ask(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.n += 1
        rid = f"probe{self.n}"
        await self.ws.send_json({"type": kind, "id": rid, **fields})
        while True:
            frame = await self.ws.receive_json(timeout=10)
            if frame.get("type") == "reply" and frame.get("id") == rid:
                assert frame["ok"], frame
                data: dict[str, Any] = frame["data"]
                return data

    async def history(self, conv: str) -> list[dict[str, Any]]:
        """Every message of ``conv``, oldest first."""
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            page = await self.ask("msg.history", conv=conv, after_seq=after, limit=100)
            out += page["messages"]
            if not page["messages"] or not page["has_more"]:
                return out
            after = page["messages"][-1]["seq"]


def chat_of(report: dict[str, Any], name: str = "chat") -> dict[str, Any]:
    s: dict[str, Any] = report["scenarios"][name]
    return s


def assert_all_accounted(s: dict[str, Any]) -> None:
    c = s["counts"]
    assert c["sent"] > 0
    assert c["sent"] == c["acked"] == c["delivered"], c
    assert c.get("lost", 0) == 0 and c.get("duplicates", 0) == 0, c
    assert s["errors"] == {}
    assert s["checks"]["ok"] is True


def test_chat_against_bare_relay_accounts_for_every_message(tmp_path: Path) -> None:
    report = run(tmp_path, "chat", "--start", "bare", "--pairs", "5", "--duration", "1.5")
    s = chat_of(report)
    assert_all_accounted(s)
    assert s["latency_ms"]["send_deliver"]["count"] == s["counts"]["delivered"]
    assert report["ok"] is True
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["schema"] == "talkbridge-load/1"
    assert saved["scenarios"]["chat"]["counts"] == s["counts"]
    speed = saved["machine"]["cpu_speed_ms"]  # how fast the machine ran, either side
    assert 0 < speed["before"] < 100 and 0 < speed["after"] < 100
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"in {speed['before']} ms before the run" in html
    # Self-contained: charts inline, nothing fetched from anywhere.
    assert html.count("<svg") >= 3
    assert "<script" not in html and "src=" not in html and "href=" not in html
    assert "@import" not in html and "url(" not in html


def test_chat_over_socketio_relay(tmp_path: Path) -> None:
    report = run(tmp_path, "chat", "--start", "socketio", "--pairs", "3", "--duration", "1.5")
    assert_all_accounted(chat_of(report))
    assert report["target"]["transport"] == "socketio"


def test_open_loop_sends_at_the_target_rate(tmp_path: Path, bare: servers.Server) -> None:
    report = run(tmp_path, "chat", "--url", bare.url, "--pairs", "4", "--rate", "400",
                 "--duration", "2")
    s = chat_of(report)
    assert_all_accounted(s)
    # A fixed schedule from the run start: 4 senders x 100/s x 2 s, whatever the lag.
    assert 780 <= s["counts"]["sent"] <= 800, s["counts"]


def test_baseline_ratios_are_reported(tmp_path: Path, bare: servers.Server) -> None:
    report = run(tmp_path, "chat", "--url", bare.url, "--pairs", "3", "--duration", "1",
                 "--baseline", "bare")
    assert_all_accounted(report["baselines"]["bare"]["scenarios"]["chat"])
    ratio = report["ratios"]["bare"]["chat"]
    assert ratio["throughput_ratio"] is not None and ratio["throughput_ratio"] > 0


def test_mix_over_two_workers(tmp_path: Path, bare: servers.Server) -> None:
    report = run(tmp_path, "--mix", "chat=80,connect=20", "--url", bare.url, "--clients", "40",
                 "--workers", "2", "--duration", "1.5", "--hold", "0.5")
    assert_all_accounted(chat_of(report))
    assert chat_of(report)["clients"] == 32
    conn = report["scenarios"]["connect"]
    assert conn["counts"]["connected"] == conn["counts"]["held"] == 8
    assert set(report["generator"]["cpu_avg_per_worker"]) == {"0", "1"}


def test_analyze_rebuilds_the_report_from_raw_records(tmp_path: Path, bare: servers.Server) -> None:
    report = run(tmp_path, "chat", "--url", bare.url, "--pairs", "2", "--duration", "1")
    out = subprocess.run(
        [sys.executable, "-m", "loadtest", "analyze", str(tmp_path / "out"), "--out",
         str(tmp_path / "again")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["scenarios"]["chat"]["counts"] == chat_of(report)["counts"]


def test_chat_against_talkbridge_matches_what_it_stored(
    tmp_path: Path, talkbridge: servers.Server
) -> None:
    report = run(tmp_path, "chat", "--url", talkbridge.url, "--pairs", "4", "--duration", "1.5",
                 "--run-id", "chat1")
    s = chat_of(report)
    assert_all_accounted(s)

    async def stored() -> int:
        total = 0
        for pair in range(4):
            sender, receiver = f"ltchat1-{2 * pair}", f"ltchat1-{2 * pair + 1}"
            async with Probe(talkbridge.url, sender) as probe:
                convs = (await probe.ask("conv.list"))["conversations"]
                conv = f"dm:{min(sender, receiver)}:{max(sender, receiver)}"
                total += next(c["last_seq"] for c in convs if c["conv"] == conv)
        return total

    assert asyncio.run(stored()) == s["counts"]["acked"]


def test_receipts_against_talkbridge(tmp_path: Path, talkbridge: servers.Server) -> None:
    report = run(tmp_path, "receipts", "--url", talkbridge.url, "--clients", "4",
                 "--duration", "1.5", "--window", "2")
    s = chat_of(report, "receipts")
    assert_all_accounted(s)
    c = s["counts"]
    assert c["receipts_sent"] == 2 * c["delivered"] == c["receipt_replies"]
    assert c["read_behind"] == 0 and c["receipts_read"] > 0


def test_group_fan_out_against_talkbridge_matches_history(
    tmp_path: Path, talkbridge: servers.Server
) -> None:
    report = run(tmp_path, "group", "--url", talkbridge.url, "--groups", "2", "--group-size",
                 "4", "--duration", "1", "--window", "2", "--run-id", "grp1")
    s = report["scenarios"]["group"]
    c = s["counts"]
    assert s["checks"]["ok"] is True, s
    assert c["delivered"] == c["expected_deliveries"] == 3 * c["acked"] > 0
    assert s["facts"]["groups"] == 2

    async def stored() -> int:
        async with Probe(talkbridge.url, "ltgrp1-0") as probe:
            groups = (await probe.ask("group.list"))["groups"]
            conv = next(f"g:{g['group']}" for g in groups)
            texts = [m for m in await probe.history(conv) if m["kind"] == "text"]
        async with Probe(talkbridge.url, "ltgrp1-4") as probe:
            groups = (await probe.ask("group.list"))["groups"]
            conv = next(f"g:{g['group']}" for g in groups)
            texts += [m for m in await probe.history(conv) if m["kind"] == "text"]
        return len(texts)

    assert asyncio.run(stored()) == c["acked"]


def test_calls_against_talkbridge_log_every_call(
    tmp_path: Path, talkbridge: servers.Server
) -> None:
    report = run(tmp_path, "calls", "--url", talkbridge.url, "--clients", "4", "--duration", "1",
                 "--run-id", "call1", "--ice", "3")
    s = report["scenarios"]["calls"]
    c = s["counts"]
    assert s["checks"]["ok"] is True, s
    assert c["calls_started"] == c["calls_completed"] == c["calls_accepted"] > 0
    assert c["ice_sent"] == c["ice_received"] == 2 * 4 * c["calls_completed"]
    assert s["latency_ms"]["call_setup"]["count"] == c["calls_completed"]

    async def logged() -> int:
        n = 0
        for pair in range(2):
            caller, callee = f"ltcall1-{2 * pair}", f"ltcall1-{2 * pair + 1}"
            async with Probe(talkbridge.url, caller) as probe:
                conv = f"dm:{min(caller, callee)}:{max(caller, callee)}"
                msgs = await probe.history(conv)
                n += sum(1 for m in msgs if m["kind"] == "call"
                         and m["body"]["outcome"] == "completed")
        return n

    # The call log is written after the hangup: give it a moment.
    for _ in range(20):
        if asyncio.run(logged()) == c["calls_completed"]:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert asyncio.run(logged()) == c["calls_completed"]


def test_connect_storm_reports_server_memory_per_connection(
    tmp_path: Path, talkbridge: servers.Server
) -> None:
    report = run(tmp_path, "connect", "--url", talkbridge.url, "--connections", "300",
                 "--hold", "1", "--duration", "0.5")
    s = report["scenarios"]["connect"]
    assert s["counts"]["connected"] == s["counts"]["held"] == 300
    assert s["checks"]["ok"] is True
    server = report["server"]
    assert server["pid"] == talkbridge.pid
    assert server["peak_connections"] == 300
    assert server["rss_per_connection_kb"] is not None


def test_bad_secret_is_counted_as_unauthorized(tmp_path: Path, bare: servers.Server) -> None:
    opts = build_parser().parse_args(
        ["run", "connect", "--url", bare.url, "--connections", "3", "--hold", "0",
         "--duration", "0.2", "--secret", "wrong", "--out", str(tmp_path / "o"), "--quiet"]
    )
    report = run_command(opts)
    s = report["scenarios"]["connect"]
    assert s["errors"] == {"connect:unauthorized": 3}
    assert report["ok"] is False


def test_console_entry_lists_scenarios() -> None:
    out = subprocess.run([sys.executable, "-m", "loadtest", "list"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert {"chat", "connect", "group", "receipts", "calls"} <= names


@pytest.mark.skipif(servers.which("py-spy") is None, reason="py-spy not installed")
def test_profile_saves_a_flame_graph_of_the_server(tmp_path: Path) -> None:
    opts = build_parser().parse_args(
        ["profile", "chat", "--pairs", "2", "--duration", "1", "--secret", SECRET,
         "--out", str(tmp_path / "prof"), "--quiet"]
    )
    from loadtest.cli import profile_command

    report = profile_command(opts)
    assert_all_accounted(chat_of(report))
    flame = tmp_path / "prof" / "flame.svg"
    assert report["profile"]["exists"] and flame.exists()
    assert "<svg" in flame.read_text()[:2000]
    hot = report["profile"]["hot"]
    assert hot["samples"] > 0 and hot["self"] and hot["inclusive"]
    # The server's own code is among what ran (sampled after start-up, so no import noise).
    assert any("signaling/" in h["function"] for h in hot["inclusive"])
    assert not any("importlib" in h["function"] for h in hot["inclusive"])


def test_lost_and_duplicated_deliveries_are_caught(tmp_path: Path) -> None:
    # A real relay with injected faults: every 7th message acked but never delivered,
    # every 11th delivered twice. The tool must count exactly those.
    srv = servers.start_baseline("bare", SECRET, extra_args=["--drop-every", "7",
                                                            "--dup-every", "11"])
    try:
        report = run(tmp_path, "chat", "--url", srv.url, "--pairs", "1", "--rate", "200",
                     "--duration", "1", "--drain", "2", "--msg-timeout", "0.5")
    finally:
        srv.stop()
    s = chat_of(report)
    c = s["counts"]
    acked = c["acked"]
    assert acked >= 150
    assert c["lost"] == acked // 7
    assert c["delivered"] == acked - acked // 7
    dups = sum(1 for n in range(1, acked + 1) if n % 11 == 0 and n % 7 != 0)
    assert c["duplicates"] == dups
    assert s["checks"]["ok"] is False and report["ok"] is False


def test_tokens_file_and_auth_frame(tmp_path: Path, talkbridge: servers.Server) -> None:
    tokens = tmp_path / "tokens.txt"
    lines = [f"tokfile-{i} {mint(SECRET, f'tokfile-{i}', 'd1', 2_000_000_000)}" for i in range(4)]
    tokens.write_text("\n".join(lines) + "\n")
    opts = build_parser().parse_args(
        ["run", "chat", "--url", talkbridge.url, "--pairs", "2", "--duration", "1",
         "--tokens-file", str(tokens), "--auth", "frame", "--out", str(tmp_path / "o"), "--quiet"]
    )
    report = run_command(opts)
    assert_all_accounted(chat_of(report))
    assert report["target"]["auth"] == "frame"


def test_group_members_spread_over_two_workers_are_all_counted(
    tmp_path: Path, talkbridge: servers.Server
) -> None:
    report = run(tmp_path, "group", "--url", talkbridge.url, "--groups", "1", "--group-size",
                 "6", "--group-senders", "2", "--workers", "2", "--duration", "1",
                 "--window", "2")
    s = report["scenarios"]["group"]
    c = s["counts"]
    assert s["checks"]["ok"] is True, s
    assert c["delivered"] == c["expected_deliveries"] == 5 * c["acked"] > 0
    assert c["connected"] == 6


@pytest.mark.postgres
def test_chat_against_talkbridge_on_postgresql_matches_what_it_stored(tmp_path: Path) -> None:
    db = asyncio.run(servers.create_database("tb_load_"))
    try:
        srv = servers.start_talkbridge(SECRET, store=db)
        try:
            report = run(tmp_path, "chat", "--url", srv.url, "--pairs", "3", "--duration", "1",
                         "--run-id", "pg1")
            s = chat_of(report)
            assert_all_accounted(s)

            async def stored() -> int:
                total = 0
                for pair in range(3):
                    a, b = f"ltpg1-{2 * pair}", f"ltpg1-{2 * pair + 1}"
                    async with Probe(srv.url, a) as probe:
                        msgs = await probe.history(f"dm:{min(a, b)}:{max(a, b)}")
                        total += sum(1 for m in msgs if m["kind"] == "text")
                return total

            assert asyncio.run(stored()) == s["counts"]["acked"]
        finally:
            srv.stop()
    finally:
        asyncio.run(servers.drop_database(db))


def test_every_device_of_both_users_gets_every_message(
    tmp_path: Path, talkbridge: servers.Server
) -> None:
    report = run(tmp_path, "chat", "--url", talkbridge.url, "--pairs", "2", "--devices", "3",
                 "--duration", "1", "--window", "4")
    s = chat_of(report)
    c = s["counts"]
    assert s["checks"]["ok"] is True, s["checks"]
    # Three receiver devices each, and the sender's two other devices (own-message sync).
    assert c["delivered"] == 3 * c["acked"] > 0
    assert c["synced"] == 2 * c["acked"]
    assert c["connected"] == 12 and c.get("duplicates", 0) == 0
