"""Real audio+video calls between two aiortc peers signalling through a talkbridge process.

Run inside the loopback-only namespace:
    scripts/netns-run .venv/bin/python -m pytest -m netns tests/calls
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from signaling.client import Client
from tests.calls.rtc_peer import CallPeer, candidate_type
from tests.calls.server import RunningServer, run_talkbridge
from tests.turn.coturn import Coturn, run_coturn

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("loopback_only")]



@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    with run_coturn(tmp_path_factory.mktemp("coturn")) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, coturn: Coturn) -> Iterator[RunningServer]:
    """talkbridge with coturn as its TURN server (and no STUN server)."""
    with run_talkbridge(tmp_path_factory.mktemp("tb"), turn_urls=coturn.url,
                        turn_secret=coturn.secret, turn_ttl="600") as srv:
        yield srv


@pytest.fixture
async def peers(server: RunningServer, request: pytest.FixtureRequest
                ) -> AsyncIterator[tuple[CallPeer, CallPeer]]:
    mode = getattr(request, "param", "p2p")
    relay_only = mode == "relay"
    alice = Client(server.ws_url, server.token("alice"), "a1", reconnect=False)
    bob = Client(server.ws_url, server.token("bob"), "b1", reconnect=False)
    await alice.connect()
    await bob.connect()
    # p2p: no ICE servers at all, so the media can only flow host to host
    a = CallPeer(alice, relay_only=relay_only, use_ice_servers=relay_only)
    b = CallPeer(bob, relay_only=relay_only, use_ice_servers=relay_only)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
        await alice.close()
        await bob.close()


async def place_call_and_hang_up(a: CallPeer, b: CallPeer, hold: float) -> dict[str, Any]:
    reply = await a.call("bob")
    assert reply["state"] == "ringing"
    async with asyncio.timeout(20):
        await asyncio.gather(a.ice_connected.wait(), b.ice_connected.wait())
    async with asyncio.timeout(20):
        await asyncio.gather(a.media_flowing.wait(), b.media_flowing.wait())
    await asyncio.sleep(hold)
    await a.hangup()
    async with asyncio.timeout(5):
        reason = await b.ended
    assert reason == "hangup"
    history = await a.client.request("msg.history", conv="dm:alice:bob", limit=100)
    [log] = [m for m in history["messages"]
             if m["kind"] == "call" and m["body"]["call_id"] == a.call_id]
    return dict(log)


async def test_an_audio_video_call_connects_peer_to_peer_and_leaves_a_log(peers):
    a, b = peers
    log = await place_call_and_hang_up(a, b, hold=2.0)
    # both sides decoded real audio and video frames
    for peer in (a, b):
        assert peer.frames["audio"] >= 10 and peer.frames["video"] >= 10
        # every candidate went through talkbridge's call.ice: none rode in the descriptions
        assert peer.sent_candidates and peer.got_candidates
        [desc] = [e["sdp"]["sdp"] for e in peer.events
                  if e["type"] in ("call.invite", "call.accepted")]
        assert "a=candidate:" not in desc
        assert {candidate_type(c) for c in peer.sent_candidates} == {"host"}
    assert log["body"]["outcome"] == "completed"
    assert log["body"]["media"] == {"audio": True, "video": True}
    assert log["body"]["duration_s"] >= 2
    # the callee sees the same log in its own history
    theirs = await b.client.request("msg.history", conv="dm:alice:bob", limit=100)
    assert log in theirs["messages"]


@pytest.mark.parametrize("peers", ["relay"], indirect=True)
async def test_a_relay_only_call_connects_through_coturn_with_our_credentials(peers):
    a, b = peers
    log = await place_call_and_hang_up(a, b, hold=1.0)
    for peer in (a, b):
        assert peer.frames["audio"] >= 10 and peer.frames["video"] >= 10
        assert {candidate_type(c) for c in peer.sent_candidates} == {"relay"}
    assert log["body"]["outcome"] == "completed"
