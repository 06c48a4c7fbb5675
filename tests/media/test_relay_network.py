"""The relay under constrained links: bitrate cap, a throttled subscriber.

Links are shaped for real with ``tc`` (htb) on the namespace's loopback, matching the UDP
port a subscriber receives on; only that subscriber's traffic is slowed.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest

from media.relay import Relay
from tests.media.peers import Peer, wait_for

pytestmark = pytest.mark.netns


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True)


@pytest.fixture
def shaper() -> Iterator[list[int]]:
    """Throttle UDP to the ports appended to the yielded list (200 kbit/s, short queue)."""
    ports: list[int] = []
    _tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")  # unclassified: unshaped
    try:
        _tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb",
            "rate", "200kbit", "ceil", "200kbit")
        _tc("qdisc", "add", "dev", "lo", "parent", "1:20", "handle", "20:", "pfifo", "limit", "20")
        yield ports
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)


def _throttle(port: int) -> None:
    _tc("filter", "add", "dev", "lo", "protocol", "ip", "parent", "1:", "prio", "1", "u32",
        "match", "ip", "protocol", "17", "0xff", "match", "ip", "dport", str(port), "0xffff",
        "flowid", "1:20")


def _unthrottle() -> None:
    _tc("filter", "del", "dev", "lo", "parent", "1:", "prio", "1")


def _local_port(peer: Peer) -> int:
    transport = peer.pc.getTransceivers()[0].receiver.transport.transport
    candidates = transport.iceGatherer.getLocalCandidates()
    return int(candidates[0].port)


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    r = Relay(
        ["127.0.0.1"], [], max_publish_bitrate=300_000, audio_only_after=1.0, audio_only_retry=6.0
    )
    try:
        yield r
    finally:
        await r.close()


def _encoder_target(peer: Peer) -> int | None:
    for t in peer.pc.getTransceivers():
        if t.kind == "video" and t.sender.track is not None:
            encoder = getattr(t.sender, "_RTCRtpSender__encoder", None)
            return getattr(encoder, "target_bitrate", None)
    return None


async def test_publishers_are_held_to_the_bitrate_cap(relay: Relay) -> None:
    alice, bob = Peer(relay, "r", "alice"), Peer(relay, "r", "bob")
    try:
        await alice.join()
        await bob.join()
        assert await wait_for(lambda: alice.frames[("bob", "video")] > 10, 15)
        # aiortc's encoder starts at 500 kbit/s; the relay's REMB brings it to the cap.
        assert await wait_for(lambda: _encoder_target(alice) == 300_000, 5), _encoder_target(alice)
        assert _encoder_target(bob) == 300_000
    finally:
        await alice.close()
        await bob.close()


async def test_a_throttled_subscriber_goes_audio_only_the_others_keep_their_frame_rate(
    relay: Relay, shaper: list[int]
) -> None:
    peers = [Peer(relay, "r", n) for n in ("alice", "bob", "carol")]
    _, bob, carol = peers
    try:
        for p in peers:
            await p.join()
        assert await wait_for(
            lambda: all(
                p.frames[(o.name, "video")] > 20 for p in peers for o in peers if o is not p
            ),
            15,
        )
        before = bob.frames[("alice", "video")]
        await asyncio.sleep(2.0)
        unthrottled_rate = (bob.frames[("alice", "video")] - before) / 2.0

        _throttle(_local_port(carol))
        assert await wait_for(lambda: bool(carol.of_kind("room.audio_only")), 15), (
            f"carol was never moved to audio only: {relay.stats('r')['carol']}"
        )
        before = bob.frames[("alice", "video")]
        await asyncio.sleep(2.0)
        throttled_rate = (bob.frames[("alice", "video")] - before) / 2.0
        assert throttled_rate >= 0.8 * unthrottled_rate, (unthrottled_rate, throttled_rate)

        # Carol still hears everyone; her video has stopped.
        audio = carol.frames[("alice", "audio")]
        video = carol.frames[("alice", "video")]
        await asyncio.sleep(1.5)
        assert carol.frames[("alice", "audio")] > audio
        assert carol.frames[("alice", "video")] - video <= 2

        # Her link recovers: the relay tries video again and it flows.
        _unthrottle()
        assert await wait_for(lambda: bool(carol.of_kind("room.video_resumed")), 10)
        video = carol.frames[("alice", "video")]
        assert await wait_for(lambda: carol.frames[("alice", "video")] > video + 15, 5)
    finally:
        for p in peers:
            await p.close()
