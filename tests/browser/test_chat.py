"""Two people chatting in two browser contexts against the real server."""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Browser, expect

from tests.browser.pages import new_device, screenshot
from tests.browser.server import Server

pytestmark = pytest.mark.netns


async def test_two_users_chat_see_receipts_and_keep_history_after_reload(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)

    await alice.open_dm("bob")
    await alice.send("Hi Bob, are you there?")
    sent = alice.tick("Hi Bob, are you there?")
    await expect(sent).to_have_attribute("data-state", "delivered")

    # Bob's list shows the unread message before he opens it.
    item = bob.conv_item(alice.dm_id("bob"))
    await expect(item.locator(".unread")).to_have_text("1")
    await expect(item.locator(".conv-last")).to_contain_text("Hi Bob, are you there?")
    await item.click()
    await expect(bob.message("Hi Bob, are you there?")).to_be_visible()
    await expect(sent).to_have_attribute("data-state", "read")

    # Typing shows on the other side, then the reply arrives.
    await bob.page.type("#composer-input", "Yes", delay=30)
    await expect(alice.page.locator("#typing")).to_have_text("bob is typing…")
    await bob.page.fill("#composer-input", "Yes, hello Alice!")
    await bob.page.press("#composer-input", "Enter")
    await expect(alice.message("Yes, hello Alice!")).to_be_visible()
    await expect(alice.page.locator("#typing")).to_be_hidden()
    await expect(bob.tick("Yes, hello Alice!")).to_have_attribute("data-state", "read")
    await screenshot(alice.page, "chat")

    # A reload keeps the session (no sign-in form) and the history.
    await alice.page.reload()
    await expect(alice.page.locator("#conn-status")).to_have_text("connected")
    await expect(alice.page.locator("#auth-view")).to_be_hidden()
    await alice.conv_item(alice.dm_id("bob")).click()
    await expect(alice.message("Hi Bob, are you there?")).to_be_visible()
    await expect(alice.message("Yes, hello Alice!")).to_be_visible()
    # The read tick is restored from the server (msg.receipts), not lost with the page.
    await expect(alice.tick("Hi Bob, are you there?")).to_have_attribute("data-state", "read")
    assert not alice.errors and not bob.errors, alice.errors + bob.errors


async def test_sender_recalls_a_message_on_both_screens(server: Server, browser: Browser) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await alice.open_dm("bob")
    await alice.send("oops, wrong chat")
    await bob.open_dm("alice")
    await expect(bob.message("oops, wrong chat")).to_be_visible()

    mine = alice.message("oops, wrong chat")
    await mine.locator("button.recall").click()
    recalled = "#messages .body.recalled"
    await expect(alice.page.locator(recalled)).to_have_text("You recalled this message")
    await expect(bob.page.locator(recalled)).to_have_text("alice recalled a message")
    await expect(bob.page.locator("#messages")).not_to_contain_text("oops, wrong chat")


async def test_history_pages_back_when_scrolled_to_the_top(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await alice.open_dm("bob")
    for i in range(1, 46):
        await alice.page.evaluate(
            """(i) => tb.client.request('msg.send', {to: {user: 'bob'}, client_msg_id: 'bulk-' + i,
                 kind: 'text', body: {text: 'message number ' + i}})""",
            i,
        )
    await bob.open_dm("alice")
    await expect(bob.message("message number 45")).to_be_visible()
    # The first page holds the latest messages only.
    assert await bob.page.locator("#messages li.msg").count() < 45
    for _ in range(10):
        await bob.page.locator("#timeline").evaluate("el => { el.scrollTop = 0; }")
        if await bob.page.get_by_text("message number 1", exact=True).count():
            break
        await asyncio.sleep(0.3)
    await expect(bob.page.get_by_text("message number 1", exact=True)).to_be_attached()
    assert await bob.page.locator("#messages li.msg").count() == 45
    await expect(bob.page.locator("#history-top")).to_have_text("Beginning of the conversation")


async def test_page_reconnects_after_server_restart_and_fills_the_gap(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await alice.open_dm("bob")
    await alice.send("before the restart")
    await bob.open_dm("alice")
    await expect(bob.message("before the restart")).to_be_visible()

    await asyncio.to_thread(server.stop)
    await expect(alice.page.locator("#banner")).to_contain_text("Reconnecting")
    # Written while the server is down: kept in the outbox, sent after the reconnect.
    await alice.send("written while offline")
    await expect(alice.tick("written while offline")).to_have_attribute("data-state", "sending")
    await asyncio.to_thread(server.start)

    await expect(alice.page.locator("#conn-status")).to_have_text("connected", timeout=30000)
    await expect(bob.page.locator("#conn-status")).to_have_text("connected", timeout=30000)
    await expect(bob.message("written while offline")).to_be_visible()
    await expect(alice.tick("written while offline")).to_have_attribute("data-state", "read")
    await expect(alice.page.locator("#banner")).to_be_hidden()
    # Exactly once on both sides: the retry with the same client_msg_id made no duplicate.
    assert await bob.message("written while offline").count() == 1
    assert await alice.message("written while offline").count() == 1


async def test_sign_out_returns_to_the_sign_in_form_and_sign_in_works(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    await alice.page.click("#signout")
    await expect(alice.page.locator("#auth-view")).to_be_visible()
    await alice.page.reload()
    await expect(alice.page.locator("#auth-view")).to_be_visible()
    await alice.page.fill("#auth-user", "alice")
    await alice.page.fill("#auth-password", "wrong-password")
    await alice.page.click("#auth-login")
    await expect(alice.page.locator("#auth-error")).to_have_text("Wrong user id or password.")
    await alice.page.fill("#auth-password", "password-123")
    await alice.page.click("#auth-login")
    await expect(alice.page.locator("#conn-status")).to_have_text("connected")


async def test_a_pasted_token_signs_in_and_survives_a_reload(
    server: Server, browser: Browser
) -> None:
    import time

    import jwt

    from tests.browser.server import JWT_SECRET

    # A token minted by "the app's own backend" with the shared HS256 secret.
    token = jwt.encode({"sub": "dora", "name": "Dora", "exp": int(time.time()) + 600},
                       JWT_SECRET, algorithm="HS256")
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(server.url + "/")
    await page.click("#auth-form details summary")
    await page.fill("#auth-token", token)
    await page.click("#auth-use-token")
    await expect(page.locator("#conn-status")).to_have_text("connected")
    await expect(page.locator("#me")).to_contain_text("Dora")
    device = await page.evaluate("tb.device")
    await page.reload()
    await expect(page.locator("#conn-status")).to_have_text("connected")
    # Same browser profile, same device id.
    assert await page.evaluate("tb.device") == device

    # A forged token is refused with a message, not a silent failure.
    await page.click("#signout")
    forged = jwt.encode({"sub": "dora", "exp": int(time.time()) + 600}, "not-the-secret" * 3,
                        algorithm="HS256")
    await page.click("#auth-form details summary")
    await page.fill("#auth-token", forged)
    await page.click("#auth-use-token")
    await expect(page.locator("#auth-error")).to_contain_text("The server refused the session")
    await expect(page.locator("#auth-view")).to_be_visible()


async def test_messages_sent_while_offline_appear_after_the_network_returns(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    bob = await new_device(browser, server.url, "bob", register=True)
    await alice.open_dm("bob")
    await alice.send("see you later")
    await bob.open_dm("alice")
    await expect(bob.message("see you later")).to_be_visible()

    # The network goes away: new connections fail, and the open socket dies (as it does once
    # keepalives time out on a real network loss).
    await alice.context.set_offline(True)
    await alice.page.evaluate("tb.client.ws.close(4000, 'network lost')")
    await expect(alice.page.locator("#banner")).to_contain_text("Reconnecting")
    await asyncio.sleep(2)  # a few failed reconnection attempts while offline
    await expect(alice.page.locator("#conn-status")).not_to_have_text("connected")
    for i in range(1, 4):
        await bob.send(f"while you were away {i}")
    await expect(bob.tick("while you were away 3")).to_have_attribute("data-state", "sent")

    await alice.context.set_offline(False)
    await expect(alice.page.locator("#conn-status")).to_have_text("connected", timeout=20000)
    for i in range(1, 4):
        await expect(alice.message(f"while you were away {i}")).to_be_visible()
    # Seen on alice's open conversation: bob's ticks turn to read.
    await expect(bob.tick("while you were away 3")).to_have_attribute("data-state", "read")


async def test_two_users_in_one_browser_profile_with_profile_urls(
    server: Server, browser: Browser
) -> None:
    context = await browser.new_context()
    pages = {}
    for name in ("alice", "bob"):
        page = await context.new_page()
        await page.goto(f"{server.url}/?profile={name}")
        await page.fill("#auth-user", name)
        await page.fill("#auth-password", "password-123")
        await page.click("#auth-register")
        await expect(page.locator("#conn-status")).to_have_text("connected")
        pages[name] = page
    # Each profile keeps its own session and device id in the shared localStorage.
    assert await pages["alice"].evaluate("tb.device") != await pages["bob"].evaluate("tb.device")
    await pages["alice"].fill("#new-dm-user", "bob")
    await pages["alice"].click("#new-dm button[type=submit]")
    await pages["alice"].fill("#composer-input", "same browser, two people")
    await pages["alice"].press("#composer-input", "Enter")
    await pages["bob"].locator("#conv-list li", has_text="alice").click()
    await expect(pages["bob"].locator("#messages")).to_contain_text("same browser, two people")
    await pages["bob"].reload()
    await expect(pages["bob"].locator("#me")).to_contain_text("bob")


async def test_a_message_too_long_for_the_server_is_marked_not_sent(
    server: Server, browser: Browser
) -> None:
    alice = await new_device(browser, server.url, "alice", register=True)
    server.register("bob")
    await alice.open_dm("bob")
    await alice.page.fill("#composer-input", "x" * 70000)
    await alice.page.press("#composer-input", "Enter")
    await expect(alice.page.locator("#toasts")).to_contain_text("Message not sent")
    await expect(alice.page.locator("#messages li.msg.failed")).to_have_count(1)
    # The connection is fine: a normal message still goes through.
    await alice.send("short one")
    await expect(alice.tick("short one")).to_have_attribute("data-state", "sent")
