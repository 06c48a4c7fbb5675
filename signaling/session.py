"""One connected device: its identity and a bounded outbound queue drained by a writer task.

Events are enqueued as complete WebSocket text frames (header + JSON), so a fan-out
serializes and frames once and every recipient session shares the same bytes. The writer
sends everything queued since it last ran in ONE transport write: under load that is one
syscall for many frames instead of one each (aiohttp's ``send_frame`` writes per frame).
Frames are whole units, so they never interleave with the pings, pongs and close frames
aiohttp writes to the same transport. A device that cannot keep up (queue full) is
disconnected with close code 4408; it reconnects and syncs, and nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import deque
from typing import Any

from aiohttp import web

from signaling.codec import encode

log = logging.getLogger(__name__)

CLOSE_AUTH_FAILED = 4401
CLOSE_REPLACED = 4409
CLOSE_TOO_SLOW = 4408
CLOSE_SHUTDOWN = 1012  # "service restart": reconnect
# Above this many bytes buffered in the transport, the writer waits for the socket to drain.
HIGH_WATER = 1 << 20


def frame_text(payload: bytes) -> bytes:
    """A complete, unmasked, final WebSocket text frame (RFC 6455 §5.2) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Session:
    """An authenticated WebSocket of one user's device."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: Any,
        user: str,
        device: str,
        *,
        name: str | None = None,
        admin: bool = False,
        queue_limit: int = 4096,
    ) -> None:
        self.ws = ws
        self.transport = transport  # the request's asyncio transport, shared with aiohttp
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
        # While > 0, events wait in _held (see hold_events); replies still go out.
        self._holds = 0
        self._held: list[bytes] = []

    @property
    def closed(self) -> bool:
        return self._closing or self.ws.closed

    def start(self) -> None:
        self.writer_task = asyncio.get_running_loop().create_task(
            self._writer(), name=f"ws-writer-{self.session_id}"
        )

    def hold_events(self) -> None:
        """Keep events back until :meth:`release_events` (a request whose reply must reach
        the device before the events it causes, e.g. ``room.join`` and the relay's offer)."""
        self._holds += 1

    def release_events(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self._held:
            held, self._held = self._held, []
            for frame in held:
                self.send_framed(frame)

    def send_reply(self, data: bytes) -> bool:
        """Queue a reply: never held back."""
        holds, self._holds = self._holds, 0
        try:
            return self.send(data)
        finally:
            self._holds = holds

    def send_framed(self, frame: bytes) -> bool:
        """Queue a complete frame (see :func:`frame_text`); False when the device is dropped."""
        if self._closing:
            return False
        if self._holds:
            self._held.append(frame)
            return True
        if len(self._queue) >= self._queue_limit:
            log.warning("dropping slow device %s/%s: send queue full", self.user, self.device)
            self.close_soon(CLOSE_TOO_SLOW, "too slow")
            return False
        self._queue.append(frame)
        self._ready.set()
        return True

    def send(self, data: bytes) -> bool:
        """Queue an encoded JSON payload."""
        return self.send_framed(frame_text(data))

    def send_obj(self, obj: Any) -> bool:
        return self.send(encode(obj))

    async def _writer(self) -> None:
        transport = self.transport
        queue = self._queue
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                if queue:
                    if transport is None or transport.is_closing():
                        return
                    n = len(queue)
                    transport.write(b"".join([queue.popleft() for _ in range(n)]))
                    self.frames_out += n
                    while transport.get_write_buffer_size() > HIGH_WATER:
                        if transport.is_closing():
                            return
                        await asyncio.sleep(0.005)  # a slow reader: let the socket drain
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
