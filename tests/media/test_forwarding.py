"""Keyframe discipline and bounded queues of the forwarding path (no network needed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from media.forwarding import (
    ForwardTrack,
    KeyframeRequester,
    OutgoingFrame,
    PublishedTrack,
    publisher_bitrate,
)
from media.frames import EncodedFrame


def _frame(n: int, key: bool) -> OutgoingFrame:
    f = EncodedFrame(data=bytes([0 if key else 1]) + bytes(10), timestamp=n * 3000,
                     keyframe=key, arrival=time.monotonic())
    return OutgoingFrame(f, "video", n)


async def _started(track: ForwardTrack) -> None:
    """Start the track the way aiortc's sender does: by waiting in recv()."""
    task = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    assert track.started
    task.cancel()


async def test_a_subscriber_gets_no_delta_frame_before_a_keyframe() -> None:
    asked: list[int] = []
    track = ForwardTrack("video", lambda: asked.append(1))
    await _started(track)
    assert asked == [1], "a keyframe is requested when the leg starts sending"
    for n in range(3):
        track.offer(_frame(n, key=False))
    track.offer(_frame(3, key=True))
    track.offer(_frame(4, key=False))
    first = await track.recv()
    second = await track.recv()
    assert (first.pts, second.pts) == (9000, 12000)
    assert bytes(first)[0] == 0


async def test_frames_offered_before_the_leg_runs_are_not_queued() -> None:
    track = ForwardTrack("video", lambda: None)
    track.offer(_frame(0, key=True))
    await _started(track)
    track.offer(_frame(1, key=False))
    assert track.frames_in == 0


async def test_overflow_flushes_and_waits_for_the_next_keyframe() -> None:
    asked: list[int] = []
    track = ForwardTrack("video", lambda: asked.append(1), max_frames=4)
    await _started(track)
    track.offer(_frame(0, key=True))
    for n in range(1, 6):  # the fifth frame finds the queue full
        track.offer(_frame(n, key=False))
    assert track.overflows == 1
    assert len(asked) == 2
    track.offer(_frame(6, key=False))  # still waiting: dropped
    track.offer(_frame(7, key=True))
    track.offer(_frame(8, key=False))
    got = [(await track.recv()).pts for _ in range(2)]
    assert got == [21000, 24000]


async def test_slow_subscriber_does_not_hold_back_the_others() -> None:
    requester = KeyframeRequester(lambda: True)
    published = PublishedTrack("t", "video", "alice", "alice", "video/VP8", requester)
    slow = published.subscribe("slow", max_frames=5)
    fast = published.subscribe("fast", max_frames=5)
    await _started(slow)
    await _started(fast)
    received = []
    for n in range(40):
        published.forward(_frame(n, key=n % 10 == 0).frame)
        received.append((await fast.recv()).pts)  # the fast one keeps up; the slow one never reads
    assert received == [n * 3000 for n in range(40)]
    assert slow.overflows > 0 and len(slow._queue) <= 5


async def test_keyframe_requests_are_coalesced_and_delayed_not_dropped() -> None:
    loop = asyncio.get_running_loop()
    sent: list[float] = []

    def send() -> bool:
        sent.append(loop.time())
        return True

    requester = KeyframeRequester(send, min_interval=0.2)
    start = loop.time()
    for _ in range(5):
        requester.request()
    assert len(sent) == 1
    await asyncio.sleep(0.05)
    requester.request()
    requester.request()
    assert len(sent) == 1
    await asyncio.sleep(0.25)
    assert len(sent) == 2
    assert sent[1] - start == pytest.approx(0.2, abs=0.05)
    await asyncio.sleep(0.3)
    assert len(sent) == 2, "no request, no keyframe"
    requester.close()


async def test_request_before_the_publisher_ssrc_is_known_is_sent_once_it_is() -> None:
    ready = False
    sent: list[int] = []

    def send() -> bool:
        if ready:
            sent.append(1)
        return ready

    requester = KeyframeRequester(send)
    requester.request()
    assert sent == []
    ready = True
    requester.retry_pending()
    assert sent == [1]


def test_publisher_bitrate_is_the_weakest_subscriber_within_floor_and_cap() -> None:
    cap, floor = 1_500_000, 150_000
    assert publisher_bitrate(cap, floor, None, []) == cap
    assert publisher_bitrate(cap, floor, None, [900_000, 600_000, 2_000_000]) == 600_000
    assert publisher_bitrate(cap, floor, None, [50_000, 900_000]) == floor, "one bad link"
    assert publisher_bitrate(cap, floor, 400_000, [900_000]) == 400_000, "publisher's uplink"
    assert publisher_bitrate(cap, floor, None, [3_000_000]) == cap
