"""Groups in the browser: create, join by id with approval, mentions, roles, mute, kick, leave."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from tests.browser.pages import User, new_device
from tests.browser.server import Server

pytestmark = pytest.mark.netns


def notice(user: User, text: str) -> Any:
    return user.page.locator("#messages li.notice", has_text=text)


def accept_confirms(user: User) -> None:
    user.page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))


async def test_group_life_from_creation_to_dissolution(server: Server, browser: Browser) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    carol = await new_device(browser, server.url, "carol", register=True)
    for u in (alice, bob, carol):
        accept_confirms(u)

    # alice creates a group with bob; it asks for approval to join.
    await alice.page.click("#open-create-group")
    await alice.page.fill("#cg-name", "Weekend trip")
    await alice.page.fill("#cg-members", "bob")
    await alice.page.select_option("#cg-policy", "approval")
    await alice.page.click("#create-group-form button[value=ok]")
    await expect(alice.page.locator("#chat-title")).to_have_text("Weekend trip")
    await expect(notice(alice, "alice created the group “Weekend trip” with bob")).to_be_visible()
    group = await alice.state("tb.chat.openConv.group")

    item = bob.page.locator("#conv-list li", has_text="Weekend trip")
    await expect(item).to_be_visible()
    await item.click()
    await expect(notice(bob, "alice created the group")).to_be_visible()

    # carol asks to join by id; alice approves from the group panel.
    await carol.page.click("#open-join-group")
    await carol.page.fill("#jg-group", group)
    await carol.page.fill("#jg-message", "can I come?")
    await carol.page.click("#join-group-form button[value=ok]")
    await expect(carol.page.locator("#toasts")).to_contain_text("Request sent")
    await alice.page.click("#btn-group-info")
    request = alice.page.locator('#group-body .request[data-user="carol"]')
    await expect(request).to_contain_text("can I come?")
    await request.locator("button", has_text="Approve").click()
    await expect(notice(alice, "carol joined (approved by alice)")).to_be_visible()
    await expect(carol.page.locator("#toasts")).to_contain_text("was approved")
    carol_item = carol.page.locator("#conv-list li", has_text="Weekend trip")
    await expect(carol_item).to_be_visible()

    # A mention flags the group in carol's list until she opens it.
    await bob.send("@carol welcome aboard")
    await expect(carol_item.locator(".mention-flag")).to_be_visible()
    await carol_item.click()
    await expect(carol.message("welcome aboard")).to_be_visible()
    await expect(carol_item.locator(".mention-flag")).to_have_count(0)

    # Roles and mutes, each with its notice in everyone's timeline.
    bob_row = alice.page.locator('#group-body li[data-user="bob"]')
    await bob_row.locator("button", has_text="Make admin").click()
    await expect(notice(carol, "alice made bob an admin")).to_be_visible()
    await expect(bob_row.locator(".role")).to_have_text("admin")
    carol_row = alice.page.locator('#group-body li[data-user="carol"]')
    await carol_row.locator("button", has_text="Mute 10 min").click()
    await expect(notice(carol, "alice muted carol")).to_be_visible()
    await carol.send("can anyone hear me?")
    failed = carol.page.locator("#messages li.msg.failed")
    await expect(failed).to_contain_text("can anyone hear me?")
    await expect(carol.page.locator("#toasts")).to_contain_text("Message not sent")

    # Invite someone directly, and rename the group from the settings.
    server.register("dave")
    invite = alice.page.locator("#group-body form.inline-form")
    await invite.locator("input").fill("dave")
    await invite.locator("button").click()
    await expect(notice(bob, "alice invited dave")).to_be_visible()
    settings = alice.page.locator("#group-body form.settings")
    await settings.locator('input[name="name"]').fill("Weekend trip (Sat)")
    await settings.locator("button[type=submit]").click()
    await expect(notice(bob, "alice renamed it “Weekend trip (Sat)”")).to_be_visible()
    await expect(bob.page.locator("#chat-title")).to_have_text("Weekend trip (Sat)")

    # Kick, leave, dissolve.
    await carol_row.locator("button", has_text="Kick").click()
    await expect(notice(alice, "alice removed carol")).to_be_visible()
    await expect(carol.page.locator("#toasts")).to_contain_text("You were removed")
    await expect(carol.page.locator("#composer-input")).to_be_disabled()
    await bob.page.click("#btn-group-info")
    await bob.page.locator("#group-body button", has_text="Leave group").click()
    await expect(notice(alice, "bob left")).to_be_visible()
    await alice.page.locator("#group-body button", has_text="Dissolve group").click()
    await expect(notice(alice, "alice dissolved the group")).to_be_visible()
    assert not alice.errors and not bob.errors and not carol.errors


async def receipt_frames(user: User, kind: str) -> list[dict[str, Any]]:
    """The ``receipt`` events of ``kind`` this page received, oldest first."""
    found: list[dict[str, Any]] = await user.page.evaluate(
        """(kind) => tb.dev.frames
             .filter((f) => f.dir === 'in' && f.frame.type === 'receipt' && f.frame.kind === kind)
             .map((f) => f.frame)""",
        kind,
    )
    return found


def readers_in(frames: list[dict[str, Any]]) -> set[str]:
    return {r["user"] for f in frames for r in f.get("receipts") or [f]}


async def test_two_members_reading_in_the_same_second_both_show_as_read(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    carol = await new_device(browser, server.url, "carol", register=True)
    await alice.page.evaluate(
        """() => tb.client.request('group.create',
             {name: 'Book club', members: ['bob', 'carol'], join_policy: 'invite_only'})"""
    )
    await alice.page.locator("#conv-list li", has_text="Book club").click()
    await expect(alice.page.locator("#chat-title")).to_have_text("Book club")
    await alice.send("Chapter 3 tonight?")
    tick = alice.tick("Chapter 3 tonight?")
    await expect(tick).to_have_attribute("data-state", "delivered")
    # Let the deliveries' coalescing window pass, so the two reads share the next one.
    await alice.page.wait_for_function(
        """() => new Set(tb.dev.frames
             .filter((f) => f.dir === 'in' && f.frame.type === 'receipt')
             .filter((f) => f.frame.kind === 'delivered')
             .flatMap((f) => (f.frame.receipts || [f.frame]).map((r) => r.user))).size === 2""",
        timeout=10000,
    )

    # bob and carol open the group at the same moment: both read it within one second.
    items = [u.page.locator("#conv-list li", has_text="Book club") for u in (bob, carol)]
    await asyncio.gather(*(item.click() for item in items))
    for u in (bob, carol):
        await expect(u.message("Chapter 3 tonight?")).to_be_visible()

    await expect(tick).to_have_attribute("data-readers", "2")
    await expect(tick).to_have_attribute("data-state", "read")
    await expect(tick).to_contain_text("read by 2")
    await expect(tick).to_have_attribute("title", "Read by bob, carol")
    # The server did coalesce them: one event carried both readers.
    reads = await receipt_frames(alice, "read")
    assert any(len(f.get("receipts") or []) == 2 for f in reads), reads
    assert readers_in(reads) == {"bob", "carol"}, reads
    assert not alice.errors and not bob.errors and not carol.errors
