"""The media scenario: aiortc participants in a group call through talkbridge's relay."""

from __future__ import annotations

import secrets
from pathlib import Path

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
            "--clients", "3", "--duration", "4", "--out", str(tmp_path / "out"), "--quiet",
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
