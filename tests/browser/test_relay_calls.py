"""1:1 calls whose media goes through the server's media relay (via "relay") in the browser."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from tests.browser.pages import User, new_device
from tests.browser.server import Server, run_server
from tests.browser.test_calls import call_log, wait_video_playing

pytestmark = pytest.mark.netns


async def frames(user: User, direction: str) -> list[dict[str, Any]]:
    """The signaling frames the page sent ("out") or received ("in"), oldest first."""
    found: list[dict[str, Any]] = await user.page.evaluate(
        "(dir) => tb.dev.frames.filter((f) => f.dir === dir).map((f) => f.frame)", direction
    )
    return found


async def call_via_relay(user: User) -> None:
    """Tick the developer panel's "calls through the media relay" on this device."""
    await user.page.click("#dev-toggle")
    await user.page.check("#dev-call-via-relay")
    await user.page.click("#dev-close")


async def audio_packets_received(user: User) -> int:
    """Audio RTP packets the call's peer connection has received, once they keep coming."""
    js = """async () => {
      let packets = 0;
      (await tbCall.pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'audio') packets += s.packetsReceived || 0;
      });
      return packets;
    }"""
    first: int = await user.page.evaluate(js)
    for _ in range(40):
        await asyncio.sleep(0.25)
        now: int = await user.page.evaluate(js)
        if now > first:
            return now - first
    return 0


async def assert_media_through_relay(user: User) -> None:
    """The call's only peer connection is the one to the relay's room, and the panel says so."""
    await user.page.click("#dev-toggle")
    card = user.page.locator('#dev-peers .peer-card[data-peer^="room:"]')
    await expect(card).to_have_count(1)
    await expect(card.locator("h4")).to_contain_text("through the media relay")
    await expect(card.locator('[data-field="media path"]')).to_contain_text("media relay (room_")
    await expect(card.locator('[data-field="connection"]')).to_have_text("connected")
    await expect(card.locator('[data-field="resolution"]')).to_contain_text("×")
    await expect(user.page.locator('#dev-peers .peer-card[data-peer="call"]')).to_have_count(0)
    names = await user.state("[...window.tbPeers.keys()]")
    room = await user.state("tbCall.roomId")
    assert names == [f"room:{room}"], names
    await user.page.click("#dev-close")
    sent = [f["type"] for f in await frames(user, "out")]
    # Negotiated with the relay only: no SDP or candidate went to the other party.
    assert "room.join" in sent and "room.sdp" in sent, sent
    assert "call.ice" not in sent and "call.sdp" not in sent, sent


async def test_video_call_through_the_media_relay(server: Server, browser: Browser) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    # alice asks for the relay; bob's own switch is off and his page follows the invite.
    await call_via_relay(alice)
    await alice.open_dm("bob")
    await bob.open_dm("alice")

    await alice.page.click("#btn-video")
    dialog = bob.page.locator("#incoming-dialog")
    await expect(dialog.locator("#incoming-title")).to_have_text("alice is calling")
    await expect(dialog.locator("#incoming-media")).to_have_text("Video call")
    await expect(alice.page.locator("#call-status")).to_have_text("Ringing…")
    invite = next(f for f in await frames(alice, "out") if f["type"] == "call.invite")
    assert invite["via"] == "relay" and "sdp" not in invite, invite
    await bob.page.click("#incoming-accept")
    await expect(dialog).to_be_hidden()

    await wait_video_playing(alice.page, "#call-remote-video")
    await wait_video_playing(bob.page, "#call-remote-video")
    await expect(alice.page.locator("#call-status")).to_contain_text("In call")
    await expect(bob.page.locator("#call-status")).to_contain_text("In call")
    # Both devices are in the same room on the relay.
    assert await alice.state("tbCall.roomId") == await bob.state("tbCall.roomId")
    await assert_media_through_relay(alice)
    await assert_media_through_relay(bob)

    # Mute works as in any call; then bob hangs up and it ends for both, with the log.
    await alice.page.click("#call-mic")
    assert await alice.state("tbCall.localStream.getAudioTracks()[0].enabled") is False
    await bob.page.click("#call-hangup")
    await expect(alice.page.locator("#call-status")).to_have_text("Call ended")
    await expect(alice.page.locator("#call-view")).to_be_hidden()
    await expect(bob.page.locator("#call-view")).to_be_hidden()
    assert await alice.state("window.tbPeers.size") == 0
    assert await bob.state("window.tbPeers.size") == 0
    await call_log(alice, "Video call · completed")
    await call_log(bob, "Video call · completed")
    assert not alice.errors and not bob.errors, alice.errors + bob.errors


async def test_server_policy_sends_a_plain_call_through_the_relay(
    tmp_path: Path, browser: Browser
) -> None:
    env = {"TALKBRIDGE_CALL_VIA_RELAY": "true"}
    with run_server(tmp_path / "data", env) as server:
        alice = await new_device(browser, server.url, "alice", register=True)
        bob = await new_device(browser, server.url, "bob", register=True)
        await alice.open_dm("bob")
        # Neither page asked for the relay: alice's invite carries an ordinary offer.
        await alice.page.click("#btn-video")
        await bob.page.click("#incoming-accept")
        invite = next(f for f in await frames(alice, "out") if f["type"] == "call.invite")
        assert "via" not in invite and invite["sdp"]["type"] == "offer", invite

        await wait_video_playing(alice.page, "#call-remote-video")
        await wait_video_playing(bob.page, "#call-remote-video")
        await assert_media_through_relay(alice)
        await assert_media_through_relay(bob)
        # Nothing was refused along the way (a call.ice for a relay call would be).
        for user in (alice, bob):
            refused = [f for f in await frames(user, "in") if f["type"] == "reply" and not f["ok"]]
            assert not refused, (user.name, refused)

        await alice.page.click("#call-hangup")
        await expect(bob.page.locator("#call-status")).to_have_text("Call ended")
        await call_log(alice, "Video call · completed")
        await call_log(bob, "Video call · completed")
        assert not alice.errors and not bob.errors, alice.errors + bob.errors


async def test_answering_a_relay_call_audio_only_still_shows_the_caller(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await call_via_relay(alice)
    await alice.open_dm("bob")
    await alice.page.click("#btn-video")
    await bob.page.click("#incoming-accept-audio")

    await wait_video_playing(bob.page, "#call-remote-video")
    await expect(alice.page.locator("#call-status")).to_contain_text("In call")
    # bob's camera stays off; he publishes audio only, and alice hears him.
    assert await bob.state("tbCall.localStream.getVideoTracks().length") == 0
    join = next(f for f in await frames(bob, "out") if f["type"] == "room.join")
    assert join["media"] == {"audio": True, "video": False}, join
    await alice.page.wait_for_function("tbCall.remoteStream.getAudioTracks().length === 1")
    # bob's audio really arrives at alice through the relay.
    assert await audio_packets_received(alice) > 0
    assert await alice.state("tbCall.remoteStream.getVideoTracks().length") == 0
    await bob.page.click("#call-hangup")
    await call_log(alice, "Video call · completed")
    assert not alice.errors and not bob.errors, alice.errors + bob.errors


async def test_relay_call_survives_a_dropped_signaling_socket(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await call_via_relay(bob)
    await bob.open_dm("alice")
    await bob.page.click("#btn-video")
    await alice.page.click("#incoming-accept")
    await wait_video_playing(alice.page, "#call-remote-video")

    # alice's WebSocket drops; her media to and from the relay goes on, the page reconnects
    # and takes its place in the call up again.
    await alice.page.evaluate("tb.client.ws.close(4000, 'test: network blip')")
    await expect(alice.page.locator("#conn-status")).not_to_have_text("connected")
    await expect(alice.page.locator("#conn-status")).to_have_text("connected", timeout=15000)
    await wait_video_playing(alice.page, "#call-remote-video")
    await wait_video_playing(bob.page, "#call-remote-video")
    await expect(alice.page.locator("#call-status")).to_contain_text("In call")

    await bob.page.click("#call-hangup")
    await expect(alice.page.locator("#call-status")).to_have_text("Call ended")
    await call_log(alice, "Video call · completed")
    assert not alice.errors and not bob.errors, alice.errors + bob.errors
