"""The media scenario: aiortc participants in a group call through talkbridge's relay."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loadtest import servers
from loadtest.cli import build_parser, run_command

pytestmark = pytest.mark.netns


def test_every_publisher_reaches_every_member_with_stamped_frames(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    srv = servers.start_talkbridge(secret, extra_env={"TALKBRIDGE_RELAY_ADDRESSES": "127.0.0.1"})
    try:
        opts = build_parser().parse_args([
            "run", "media", "--url", srv.url, "--secret", secret, "--media-size", "3",
            "--clients", "3", "--duration", "4", "--workers", "2", "--out", str(tmp_path / "out"),
            "--quiet",
        ])
        report = run_command(opts)
    finally:
        srv.stop()
    s = report["scenarios"]["media"]
    if s["errors"].get("room.join:unsupported"):
        pytest.skip("the server does not speak room.* yet")
    c = s["counts"]
    assert s["checks"]["ok"] is True, s
    assert c["expected_video_streams"] == 6 == c["video_streams_receiving"]
    assert c["video_frames_received"] > 0
    assert s["latency_ms"]["frame_delay"]["count"] > 0
    # Loopback, three participants: nothing should go missing.
    assert s["checks"]["video_loss"] is not None and s["checks"]["video_loss"] < 0.05
    # And the streams keep up: most of what the publishers produced reached every member.
    assert s["checks"]["video_delivery_ratio"] > 0.8, s["checks"]


class RelayLink:
    """Carries a participant's room.* requests straight to a real in-process relay.

    It stands in for the server's room.* signaling (not written yet) so the participant's
    negotiation and the stamped media are exercised against the real relay and real peers.
    """

    def __init__(self, relay: object, room: str, user: str) -> None:
        self.relay = relay
        self.room = room
        self.user = user
        self.handler: Callable[[dict[str, Any]], None] = lambda _frame: None
        self.closed = False

    async def send(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        data = None
        if kind == "room.sdp":
            data = await self.relay.on_sdp(self.room, self.user, frame["sdp"])  # type: ignore[attr-defined]
        elif kind == "room.ice":
            await self.relay.on_ice(self.room, self.user, frame.get("candidate"))  # type: ignore[attr-defined]
        elif kind == "room.leave":
            await self.relay.leave(self.room, self.user)  # type: ignore[attr-defined]
        self.handler({"type": "reply", "id": frame["id"], "ok": True, "data": data or {}})


async def test_participants_negotiate_with_the_relay_and_read_every_stream() -> None:
    import asyncio

    from loadtest.media_peer import Participant
    from loadtest.recorder import Stats
    from media.relay import Relay

    relay = Relay(["127.0.0.1"])
    stats = Stats()
    people: list[Participant] = []
    try:
        for name in ("ann", "bob", "cat"):
            link = RelayLink(relay, "r1", name)
            p = Participant(stats, len(people), link, True, 15.0)  # type: ignore[arg-type]
            p.room = "r1"
            p.count_from_ms = 0  # time and count every frame
            p.tasks.append(asyncio.get_running_loop().create_task(p.run_inbox()))
            await relay.join("r1", name, user=name, device="d1", publish_audio=True,
                             publish_video=True, emit=p.on_frame)
            people.append(p)
        for _ in range(100):
            if stats.counts["video_streams_receiving"] >= 6:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
    finally:
        for p in people:
            await p.close()
        await relay.close()
    c = stats.counts
    assert c["video_streams_receiving"] == 6, dict(c)
    assert c["video_frames_received"] > 6 * 15
    assert c["video_frames_unreadable"] == 0
    assert stats.hists["frame_delay"].get_value_at_percentile(50) < 200_000  # µs
    assert stats.errors == {}
