"""Webhook pusher: POST each push as JSON to a configured URL, retried with backoff.

Pushes are queued and sent by a background task, so a slow webhook never delays a reply.
"""

from __future__ import annotations

import asyncio
import logging
import random

import aiohttp
import msgspec

from im_bridge.push import PushNotification

log = logging.getLogger("talkbridge.push")


class WebhookPusher:
    """Deliver pushes to ``url``; retries 5xx and network errors up to ``retries`` times."""

    def __init__(self, url: str, retries: int = 5, queue_limit: int = 100_000) -> None:
        self.url = url
        self.retries = retries
        self._queue: asyncio.Queue[PushNotification] = asyncio.Queue(queue_limit)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failed = 0

    async def push(self, note: PushNotification) -> None:
        if self._task is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            self._task = asyncio.get_running_loop().create_task(self._run(), name="push-webhook")
        try:
            self._queue.put_nowait(note)
        except asyncio.QueueFull:
            self.failed += 1
            log.error("push queue full: dropping push to %s", note.user)

    async def _run(self) -> None:
        while True:
            note = await self._queue.get()
            try:
                await self._send(note)
            finally:
                self._queue.task_done()

    async def _send(self, note: PushNotification) -> None:
        assert self._session is not None
        body = msgspec.json.encode(note)
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                async with self._session.post(
                    self.url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    if resp.status < 300:
                        self.delivered += 1
                        return
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        log.error("push webhook refused %s: HTTP %d", note.user, resp.status)
                        self.failed += 1
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("push webhook attempt %d failed: %s", attempt + 1, exc)
            await asyncio.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 10.0)
        self.failed += 1
        log.error("push to %s dropped after %d attempts", note.user, self.retries + 1)

    async def close(self) -> None:
        """Give queued pushes a moment to go out, then stop."""
        if self._task is not None:
            try:
                async with asyncio.timeout(3.0):
                    await self._queue.join()
            except TimeoutError:
                log.warning("%d pushes not sent at shutdown", self._queue.qsize())
            self._task.cancel()
        if self._session is not None:
            await self._session.close()
