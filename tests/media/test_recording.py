"""Recording a room's forwarded media to files (off by default, opt-in per room)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import av
import pytest

from media.relay import Relay
from tests.media.peers import HEIGHT, WIDTH, Peer, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture(params=["VP8", "H264"])
async def relay(request: pytest.FixtureRequest) -> AsyncIterator[Relay]:
    r = Relay(["127.0.0.1"], [], video_codec=request.param)
    try:
        yield r
    finally:
        await r.close()


def _decode(path: str) -> tuple[int, tuple[int, int] | None, int]:
    video, size = 0, None
    with av.open(path) as container:
        for frame in container.decode(video=0):
            video += 1
            size = (frame.width, frame.height)
    with av.open(path) as container:
        audio = sum(1 for _ in container.decode(audio=0))
    return video, size, audio


async def test_a_recorded_room_leaves_a_playable_webm_per_publisher(
    relay: Relay, tmp_path: Path
) -> None:
    alice, bob = Peer(relay, "r", "alice"), Peer(relay, "r", "bob")
    try:
        await alice.join()
        await bob.join()
        assert await wait_for(lambda: alice.frames[("bob", "video")] > 10, 15)
        started = await relay.start_recording("r", tmp_path)
        assert len(started) == 2
        await asyncio.sleep(2.5)
        paths = await relay.stop_recording("r")
        assert sorted(paths) == sorted(started)
        for path in paths:
            assert Path(path).name.startswith(("r-alice-", "r-bob-"))
            assert path.endswith(".webm" if relay.video_codec == "VP8" else ".mkv")
            video, size, audio = await asyncio.to_thread(_decode, path)
            # ~2.5 s of 30 fps video and 50 audio frames/s, decodable from the first frame.
            assert video >= 40, (path, video)
            assert size == (WIDTH, HEIGHT)
            assert audio >= 60, (path, audio)
        before = alice.frames[("bob", "video")]
        await asyncio.sleep(0.5)
        assert alice.frames[("bob", "video")] > before, "forwarding goes on after recording"
    finally:
        await alice.close()
        await bob.close()
