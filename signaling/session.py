"""One connected device: its identity and a bounded outbound queue drained by a writer task.

Events are enqueued as already-encoded bytes, so a fan-out serializes once and every
recipient session shares the same bytes. A device that cannot keep up (queue full) is
disconnected with close code 4408; it reconnects and syncs, and nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Any

from aiohttp import WSMsgType, web

from signaling.codec import encode

log = logging.getLogger(__name__)

CLOSE_AUTH_FAILED = 4401
CLOSE_REPLACED = 4409
CLOSE_TOO_SLOW = 4408
CLOSE_SHUTDOWN = 1012  # "service restart": reconnect


class Session:
    """An authenticated WebSocket of one user's device."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        user: str,
        device: str,
        *,
        name: str | None = None,
        admin: bool = False,
        queue_limit: int = 4096,
    ) -> None:
        self.ws = ws
        self.user = user
        self.device = device
        self.name = name or user
        self.admin = admin
        self.session_id = secrets.token_hex(8)
        self.connected_at = time.time()
        self._queue: deque[bytes] = deque()
        self._queue_limit = queue_limit
        self._ready = asyncio.Event()
        self._closing = False
        self.writer_task: asyncio.Task[None] | None = None
        self.frames_out = 0

    @property
    def closed(self) -> bool:
        return self._closing or self.ws.closed

    def start(self) -> None:
        self.writer_task = asyncio.get_running_loop().create_task(
            self._writer(), name=f"ws-writer-{self.session_id}"
        )

    def send(self, data: bytes) -> bool:
        """Queue an encoded frame; False (and the device is dropped) when the queue is full."""
        if self._closing:
            return False
        if len(self._queue) >= self._queue_limit:
            log.warning("dropping slow device %s/%s: send queue full", self.user, self.device)
            self.close_soon(CLOSE_TOO_SLOW, "too slow")
            return False
        self._queue.append(data)
        self._ready.set()
        return True

    def send_obj(self, obj: Any) -> bool:
        return self.send(encode(obj))

    async def _writer(self) -> None:
        ws = self.ws
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._queue:
                    data = self._queue.popleft()
                    await ws.send_frame(data, WSMsgType.TEXT)
                    self.frames_out += 1
                if self._closing:
                    return
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            return

    def close_soon(self, code: int, message: str) -> None:
        """Flush what is queued, then close with ``code`` (without awaiting here)."""
        if self._closing:
            return
        self._closing = True
        self._ready.set()

        async def _close() -> None:
            if self.writer_task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self.writer_task), 2.0)
                except (TimeoutError, asyncio.CancelledError):
                    self.writer_task.cancel()
            await self.ws.close(code=code, message=message.encode())

        asyncio.get_running_loop().create_task(_close())

    async def flush_and_close(self, code: int, message: str) -> None:
        """Close after flushing the queue, and wait for it."""
        self.close_soon(code, message)
        if self.writer_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.writer_task), 2.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
        await self.ws.close(code=code, message=message.encode())
