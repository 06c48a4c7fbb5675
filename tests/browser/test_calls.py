"""1:1 calls between browser contexts: ringing on every device, media flowing, call logs, TURN."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from tests.browser.pages import User, new_device, screenshot, video_stats
from tests.browser.server import Server, run_server

pytestmark = pytest.mark.netns


async def wait_video_playing(page: Page, selector: str) -> dict[str, Any]:
    """Wait until the <video> shows frames and its decoder's frame count keeps rising."""
    await page.wait_for_function(
        "(sel) => { const v = document.querySelector(sel); return v && v.videoWidth > 0; }",
        arg=selector, timeout=20000,
    )
    first = await video_stats(page, selector)
    await asyncio.sleep(1.5)
    second = await video_stats(page, selector)
    assert second["width"] > 0, second
    assert second["frames"] > first["frames"], (first, second)
    return second


async def call_log(user: User, text: str) -> None:
    await expect(user.page.locator("#messages li.call-log", has_text=text)).to_be_visible(
        timeout=10000
    )


async def test_video_call_rings_every_callee_device_and_connects(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    bob_phone = await new_device(browser, server.url, "bob", register=False)
    await alice.open_dm("bob")
    await bob.open_dm("alice")

    await alice.page.click("#btn-video")
    for device in (bob, bob_phone):
        dialog = device.page.locator("#incoming-dialog")
        await expect(dialog).to_be_visible()
        await expect(dialog.locator("#incoming-title")).to_have_text("alice is calling")
        await expect(dialog.locator("#incoming-media")).to_have_text("Video call")
    await expect(alice.page.locator("#call-status")).to_have_text("Ringing…")
    await screenshot(bob.page, "incoming-call")

    await bob.page.click("#incoming-accept")
    # The other device stops ringing as soon as this one answers.
    await expect(bob_phone.page.locator("#incoming-dialog")).to_be_hidden()
    await expect(bob_phone.page.locator("#toasts")).to_contain_text("answered on another device")
    await expect(bob.page.locator("#incoming-dialog")).to_be_hidden()

    await wait_video_playing(alice.page, "#call-remote-video")
    await wait_video_playing(bob.page, "#call-remote-video")
    await expect(alice.page.locator("#call-status")).to_contain_text("In call")
    assert await bob_phone.state("window.tbPeers.size") == 0

    # The developer panel shows the pair and live numbers for the call.
    await alice.page.click("#dev-toggle")
    card = alice.page.locator('#dev-peers [data-peer="call"]')
    await expect(card.locator('[data-field="candidate pair"]')).to_contain_text("host → host")
    await expect(card.locator('[data-field="resolution"]')).to_contain_text("×")
    await expect(alice.page.locator("#dev-frames")).to_contain_text("call.accepted")
    await screenshot(alice.page, "developer-panel")
    await alice.page.click("#dev-close")

    # Mute the camera, then hang up; both chats get the call log.
    await alice.page.click("#call-cam")
    assert await alice.state("tbCall.localStream.getVideoTracks()[0].enabled") is False
    await alice.page.click("#call-hangup")
    await expect(bob.page.locator("#call-status")).to_have_text("Call ended")
    await expect(alice.page.locator("#call-view")).to_be_hidden()
    await expect(bob.page.locator("#call-view")).to_be_hidden()
    await call_log(alice, "Video call · completed")
    await call_log(bob, "Video call · completed")
    assert not alice.errors and not bob.errors, alice.errors + bob.errors


async def test_declined_call_tells_the_caller_and_leaves_a_log(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await alice.open_dm("bob")
    await alice.page.click("#btn-audio")
    await expect(bob.page.locator("#incoming-media")).to_have_text("Audio call")
    await bob.page.click("#incoming-decline")
    await expect(alice.page.locator("#toasts")).to_contain_text("Call declined")
    await expect(alice.page.locator("#call-view")).to_be_hidden()
    await call_log(alice, "Audio call · declined")


async def test_answering_audio_only_sends_no_video_but_still_sees_the_caller(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await alice.open_dm("bob")
    await alice.page.click("#btn-video")
    await bob.page.click("#incoming-accept-audio")
    await wait_video_playing(bob.page, "#call-remote-video")
    await expect(alice.page.locator("#call-status")).to_contain_text("In call")
    # bob's camera stays off: alice receives his audio and no video.
    assert await bob.state("tbCall.localStream.getVideoTracks().length") == 0
    assert await alice.state("tbCall.remoteStream.getAudioTracks().length") == 1
    assert await alice.state(
        "tbCall.pc.getReceivers().filter((r) => r.track.kind === 'video')"
        ".every((r) => r.track.muted)"
    )
    await bob.page.click("#call-hangup")
    await call_log(alice, "Video call · completed")


async def test_relay_only_call_connects_through_coturn(
    turn_server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, turn_server.url, "alice", register=True)
    bob = await new_device(browser, turn_server.url, "bob", register=True)
    await alice.page.click("#dev-toggle")
    # Relay-only ICE: the 1:1 call stays peer to peer, but only through coturn's candidates.
    await alice.page.check("#dev-relay-only")
    await alice.open_dm("bob")
    await alice.page.click("#btn-video")
    await bob.page.click("#incoming-accept")

    await wait_video_playing(alice.page, "#call-remote-video")
    await wait_video_playing(bob.page, "#call-remote-video")
    card = alice.page.locator('#dev-peers [data-peer="call"]')
    await expect(card.locator('[data-field="ICE policy"]')).to_have_text("relay")
    await expect(card.locator('[data-field="media path"]')).to_have_text("peer to peer")
    await expect(card.locator('[data-field="candidate pair"]')).to_contain_text("relay →")
    pair = await alice.state("window.tbStats.get('call').pair")
    assert pair["local"] == "relay", pair
    # Every candidate alice offered was a relay one: nothing went around coturn.
    types = await alice.page.evaluate(
        """async () => {
          const out = [];
          (await tbCall.pc.getStats()).forEach((s) => {
            if (s.type === 'local-candidate') out.push(s.candidateType);
          });
          return out;
        }"""
    )
    assert types and set(types) == {"relay"}, types
    await alice.page.click("#call-hangup")
    await call_log(bob, "Video call · completed")


async def test_call_survives_a_dropped_signaling_socket(server: Server, browser: Browser) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await alice.open_dm("bob")
    await alice.page.click("#btn-video")
    await bob.page.click("#incoming-accept")
    await wait_video_playing(alice.page, "#call-remote-video")

    # alice's WebSocket drops (as on a flaky network); media goes on peer to peer and the
    # page reconnects by itself, resuming its place in the call.
    await alice.page.evaluate("tb.client.ws.close(4000, 'test: network blip')")
    await expect(alice.page.locator("#conn-status")).not_to_have_text("connected")
    await expect(alice.page.locator("#conn-status")).to_have_text("connected", timeout=15000)
    await wait_video_playing(alice.page, "#call-remote-video")
    await expect(alice.page.locator("#call-status")).to_contain_text("In call")

    # The hangup still reaches alice after the reconnect.
    await bob.page.click("#call-hangup")
    await expect(alice.page.locator("#call-status")).to_have_text("Call ended")
    await expect(alice.page.locator("#call-view")).to_be_hidden()
    await call_log(alice, "Video call · completed")


async def test_calling_each_other_at_once_ends_in_one_call(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await alice.open_dm("bob")
    await bob.open_dm("alice")
    await asyncio.gather(alice.page.click("#btn-video"), bob.page.click("#btn-video"))

    # The server keeps one of the two calls; the page whose call lost answers the other.
    await wait_video_playing(alice.page, "#call-remote-video")
    await wait_video_playing(bob.page, "#call-remote-video")
    assert await alice.state("tbCall.id") == await bob.state("tbCall.id")
    await expect(alice.page.locator("#incoming-dialog")).to_be_hidden()
    await expect(bob.page.locator("#incoming-dialog")).to_be_hidden()
    await alice.page.click("#call-hangup")
    await call_log(bob, "Video call · completed")


async def test_unanswered_call_times_out_as_missed_on_both_sides(
    tmp_path: Path, browser: Browser
) -> None:
    with run_server(tmp_path / "data", {"TALKBRIDGE_CALL_TIMEOUT": "3"}) as server:
        alice = await new_device(browser, server.url, "alice", register=True)
        bob = await new_device(browser, server.url, "bob", register=True)
        await alice.open_dm("bob")
        await bob.open_dm("alice")
        await alice.page.click("#btn-audio")
        await expect(bob.page.locator("#incoming-dialog")).to_be_visible()
        # Nobody answers: the dialog closes by itself and both chats log the call.
        await expect(bob.page.locator("#incoming-dialog")).to_be_hidden(timeout=10000)
        await expect(alice.page.locator("#toasts")).to_contain_text("No answer")
        await call_log(alice, "Audio call · no answer")
        await call_log(bob, "Audio call · missed")


async def test_denied_camera_says_so_and_places_no_call(server: Server) -> None:
    from playwright.async_api import async_playwright

    from tests.browser.pages import CHROMIUM, CHROMIUM_ARGS

    # A browser whose permission prompt always answers "block".
    args = [a for a in CHROMIUM_ARGS if not a.startswith("--use-fake-ui-for-media-stream")]
    async with async_playwright() as pw:
        denying = await pw.chromium.launch(
            executable_path=CHROMIUM, args=[*args, "--use-fake-ui-for-media-stream=deny"]
        )
        try:
            alice = await new_device(denying, server.url, "alice", register=True)
            server.register("bob")
            await alice.open_dm("bob")
            await alice.page.click("#btn-video")
            await expect(alice.page.locator("#toasts")).to_contain_text(
                "Access to the camera and microphone was denied"
            )
            await expect(alice.page.locator("#call-view")).to_be_hidden()
            frames = await alice.state("tb.dev.frames.map((f) => f.frame.type)")
            assert "call.invite" not in frames and "call.cancel" not in frames
        finally:
            await denying.close()
