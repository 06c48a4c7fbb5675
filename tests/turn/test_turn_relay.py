"""A real coturn with TURN REST auth accepts our credentials and refuses expired or forged ones."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from signaling.config import Config
from signaling.ice import ice_servers_for, turn_credentials
from tests.turn.coturn import Coturn, uclient_allocates

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("loopback_only")]


def relay_only(servers: list[dict[str, Any]]) -> RTCConfiguration:
    """An aiortc configuration that may only use relay candidates from ``servers``."""
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=s["urls"], username=s.get("username"),
                                 credential=s.get("credential")) for s in servers],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )


def candidate_types(sdp: str) -> set[str]:
    return {line.split(" typ ")[1].split()[0]
            for line in sdp.splitlines() if line.startswith("a=candidate:")}



def servers_for(
    coturn: Coturn, user: str, now: float, secret: str | None = None
) -> list[dict[str, Any]]:
    cfg = Config(turn_urls=[coturn.url], turn_secret=secret or coturn.secret, turn_ttl=300)
    return ice_servers_for(cfg, user, now)


async def test_a_relay_only_peer_gets_a_relay_candidate_and_connects_with_our_credentials(coturn):
    now = time.time()
    a = RTCPeerConnection(relay_only(servers_for(coturn, "alice", now)))
    b = RTCPeerConnection(relay_only(servers_for(coturn, "bob", now)))
    try:
        channel = a.createDataChannel("chat")
        received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        @b.on("datachannel")
        def on_datachannel(ch):
            @ch.on("message")
            def on_message(msg):
                if not received.done():
                    received.set_result(msg)

        @channel.on("open")
        def on_open():
            channel.send("over the relay")

        await a.setLocalDescription(await a.createOffer())
        assert candidate_types(a.localDescription.sdp) == {"relay"}
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        assert candidate_types(b.localDescription.sdp) == {"relay"}
        await a.setRemoteDescription(b.localDescription)

        async with asyncio.timeout(20):
            text = await received
        assert text == "over the relay"
        assert a.iceConnectionState in ("connected", "completed")
        assert b.iceConnectionState in ("connected", "completed")
    finally:
        await a.close()
        await b.close()


async def test_expired_credentials_get_no_relay_candidate(coturn):
    # Credentials minted 10 minutes ago with a 5 minute TTL: expired 5 minutes ago.
    pc = RTCPeerConnection(relay_only(servers_for(coturn, "alice", time.time() - 600)))
    try:
        pc.createDataChannel("x")
        await pc.setLocalDescription(await pc.createOffer())
        assert "relay" not in candidate_types(pc.localDescription.sdp)
    finally:
        await pc.close()


async def test_forged_credentials_get_no_relay_candidate(coturn):
    pc = RTCPeerConnection(relay_only(servers_for(coturn, "mallory", time.time(),
                                                  secret="guessed-secret")))
    try:
        pc.createDataChannel("x")
        await pc.setLocalDescription(await pc.createOffer())
        assert "relay" not in candidate_types(pc.localDescription.sdp)
    finally:
        await pc.close()


def test_uclient_allocates_with_fresh_credentials(coturn):
    username, password = turn_credentials(coturn.secret, "alice", int(time.time()) + 300)
    assert uclient_allocates(coturn.port, username, password) == 0


def test_uclient_is_refused_with_expired_credentials(coturn):
    username, password = turn_credentials(coturn.secret, "alice", int(time.time()) - 1)
    assert uclient_allocates(coturn.port, username, password) == 255


def test_uclient_is_refused_with_a_forged_password(coturn):
    username, _ = turn_credentials(coturn.secret, "alice", int(time.time()) + 300)
    _, forged = turn_credentials("not-the-secret", "alice", int(time.time()) + 300)
    assert uclient_allocates(coturn.port, username, forged) == 255


def test_uclient_is_refused_when_the_username_is_changed_after_signing(coturn):
    # Extending one's own expiry (or swapping the user) invalidates the HMAC.
    expiry = int(time.time()) + 300
    _, password = turn_credentials(coturn.secret, "alice", expiry)
    assert uclient_allocates(coturn.port, f"{expiry + 86400}:alice", password) == 255
