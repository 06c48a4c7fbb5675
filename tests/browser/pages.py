"""Driving the demo page the way a person does: sign up, open a chat, type, call."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, BrowserContext, Page, expect

ROOT = Path(__file__).resolve().parents[2]
# Every run saves its screenshots as CI artifacts (git-ignored); the README's copies under
# docs/screenshots/ are refreshed on purpose, with TALKBRIDGE_UPDATE_SCREENSHOTS=1, so a
# plain test run leaves the work tree clean.
ARTIFACTS = ROOT / "artifacts" / "screenshots"
DOC_SCREENSHOTS = ROOT / "docs" / "screenshots"

CHROMIUM = "/usr/bin/chromium"
# The flags docs/WEBRTC-TESTING fixed: fake camera/microphone, loopback ICE, no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


class User:
    """One browser context (one device) signed in as ``name``."""

    def __init__(self, name: str, context: BrowserContext, page: Page) -> None:
        self.name = name
        self.context = context
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    async def open_dm(self, peer: str) -> None:
        """Open (or start) the direct chat with ``peer``."""
        item = self.conv_item(self.dm_id(peer))
        if await item.count():
            await item.click()
        else:
            await self.page.fill("#new-dm-user", peer)
            await self.page.click("#new-dm button[type=submit]")
        await expect(self.page.locator("#chat-title")).to_have_text(peer)

    def dm_id(self, peer: str) -> str:
        a, b = sorted([self.name, peer])
        return f"dm:{a}:{b}"

    def conv_item(self, conv: str) -> Any:
        return self.page.locator(f'#conv-list li[data-conv="{conv}"]')

    async def send(self, text: str) -> None:
        await self.page.fill("#composer-input", text)
        await self.page.press("#composer-input", "Enter")

    def tick(self, text: str) -> Any:
        """The tick of my message ``text``: data-state sending, sent, delivered or read."""
        return self.message(text).locator(".tick")

    def message(self, text: str) -> Any:
        return self.page.locator("#messages li.msg", has_text=text)

    async def state(self, expr: str) -> Any:
        """Evaluate a JS expression in the page (``tb`` is the app object)."""
        return await self.page.evaluate(expr)


async def new_device(browser: Browser, base_url: str, name: str, *, register: bool,
                     password: str = "password-123") -> User:
    """A new browser context (its own localStorage, so its own device id) signed in as ``name``."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    await context.grant_permissions(["camera", "microphone"], origin=base_url)
    page = await context.new_page()
    await page.goto(base_url + "/")
    await page.fill("#auth-user", name)
    await page.fill("#auth-password", password)
    if register:
        await page.click("#auth-register")
    else:
        await page.click("#auth-login")
    await expect(page.locator("#conn-status")).to_have_text("connected", timeout=15000)
    return User(name, context, page)


async def launch(playwright: Any) -> Browser:
    """Debian's Chromium with fake media devices (never a downloaded browser)."""
    browser: Browser = await playwright.chromium.launch(
        executable_path=CHROMIUM, args=CHROMIUM_ARGS
    )
    return browser


async def screenshot(page: Page, name: str) -> None:
    """Save ``<name>.png`` under artifacts/screenshots/ (and docs/screenshots/ when updating)."""
    dirs = [ARTIFACTS]
    if os.environ.get("TALKBRIDGE_UPDATE_SCREENSHOTS") == "1":
        dirs.append(DOC_SCREENSHOTS)
    png = await page.screenshot()
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.png").write_bytes(png)


async def video_stats(page: Page, selector: str) -> dict[str, Any]:
    """videoWidth of a <video> and the frames decoded so far for its video track."""
    js = """
    async (sel) => {
      const v = document.querySelector(sel);
      if (!v) return {width: 0, frames: 0, missing: true};
      const stream = v.srcObject;
      const track = stream && stream.getVideoTracks()[0];
      let frames = 0;
      if (track) {
        for (const {pc} of window.tbPeers.values()) {
          const recv = pc.getReceivers().find((r) => r.track === track);
          if (!recv) continue;
          const stats = await recv.getStats();
          stats.forEach((s) => {
            if (s.type === 'inbound-rtp' && s.kind === 'video') frames = s.framesDecoded || 0;
          });
        }
      }
      return {width: v.videoWidth, height: v.videoHeight, frames};
    }
    """
    result: dict[str, Any] = await page.evaluate(js, selector)
    return result


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]
