"""A group call of three browsers through the server's media relay."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from tests.browser.pages import User, new_device, screenshot, video_stats
from tests.browser.server import Server

pytestmark = pytest.mark.netns


def notice(user: User, text: str) -> Any:
    return user.page.locator("#messages li.notice", has_text=text)


async def remote_tiles_decoding(user: User, others: list[str]) -> None:
    """Each other participant has a named tile whose video plays with rising framesDecoded."""
    page = user.page
    for name in others:
        tile = page.locator(f'#room-tiles figure.tile[data-user="{name}"]')
        await expect(tile.locator("figcaption")).to_have_text(name)
        sel = f'#room-tiles figure.tile[data-user="{name}"] video'
        await page.wait_for_function(
            "(sel) => { const v = document.querySelector(sel); return v && v.videoWidth > 0; }",
            arg=sel, timeout=30000,
        )
        first = await video_stats(page, sel)
        await asyncio.sleep(1.5)
        second = await video_stats(page, sel)
        assert second["frames"] > first["frames"], (user.name, name, first, second)


async def test_three_people_in_a_group_call_see_each_other(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    carol = await new_device(browser, server.url, "carol", register=True)
    await alice.page.evaluate(
        """() => tb.client.request('group.create',
             {name: 'Standup', members: ['bob', 'carol'], join_policy: 'invite_only'})"""
    )
    for u in (alice, bob, carol):
        await u.page.locator("#conv-list li", has_text="Standup").click()
        await expect(u.page.locator("#chat-title")).to_have_text("Standup")

    await alice.page.click("#btn-room")
    await expect(alice.page.locator("#room-view")).to_be_visible()
    # A member who reloads learns of the running call from the group's timeline.
    await carol.page.reload()
    await carol.page.locator("#conv-list li", has_text="Standup").click()
    await expect(notice(carol, "alice started a group call")).to_be_visible()
    # The others see that a call is running and join from the banner.
    for u in (bob, carol):
        await expect(u.page.locator("#room-banner")).to_be_visible()
        await expect(u.page.locator("#room-banner-text")).to_contain_text("started by alice")
        await u.page.click("#room-banner-join")
        await expect(u.page.locator("#room-view")).to_be_visible()

    await remote_tiles_decoding(alice, ["bob", "carol"])
    await remote_tiles_decoding(bob, ["alice", "carol"])
    await remote_tiles_decoding(carol, ["alice", "bob"])
    await expect(alice.page.locator("#room-status")).to_contain_text("3 people")
    await screenshot(alice.page, "group-call")

    # carol leaves: her tile goes away for the others; the call goes on.
    await carol.page.click("#room-leave")
    await expect(carol.page.locator("#room-view")).to_be_hidden()
    await expect(alice.page.locator('#room-tiles figure.tile[data-user="carol"]')).to_have_count(0)
    await remote_tiles_decoding(alice, ["bob"])
    await alice.page.click("#room-leave")
    await bob.page.click("#room-leave")
    # The last one out ends the call: a notice in the timeline, and the banner goes away.
    await expect(notice(carol, "The group call ended")).to_be_visible()
    await expect(carol.page.locator("#room-banner")).to_be_hidden()
    assert not alice.errors and not bob.errors and not carol.errors


async def test_group_call_with_relay_only_ice_goes_through_turn(
    turn_server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, turn_server.url, "alice", register=True)
    bob = await new_device(browser, turn_server.url, "bob", register=True)
    await alice.page.evaluate(
        """() => tb.client.request('group.create',
             {name: 'Relayed', members: ['bob'], join_policy: 'invite_only'})"""
    )
    await alice.page.click("#dev-toggle")
    await alice.page.check("#dev-relay-only")
    for u in (alice, bob):
        await u.page.locator("#conv-list li", has_text="Relayed").click()
        await u.page.click("#btn-room")
        await expect(u.page.locator("#room-view")).to_be_visible()
    await remote_tiles_decoding(alice, ["bob"])
    await remote_tiles_decoding(bob, ["alice"])
    card = alice.page.locator("#dev-peers .peer-card")
    await expect(card.locator('[data-field="ICE policy"]')).to_have_text("relay")
    await expect(card.locator('[data-field="candidate pair"]')).to_contain_text("relay →")
