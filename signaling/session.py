"""One connected device: its identity and a bounded outbound queue drained by a writer task.

Events are enqueued as complete WebSocket text frames (header + JSON), so a fan-out
serializes and frames once and every recipient session shares the same bytes. Once per
turn of the event loop, one callback writes what each session queued meanwhile in ONE
transport write: under load that is one syscall for many frames instead of one each
(aiohttp's ``send_frame`` writes per frame), and no task wakes per session (a 500-member
group message would wake 500). Frames are whole units, so they never interleave with the
pings, pongs and close frames aiohttp writes to the same transport. A socket whose buffer
passes HIGH_WATER is left to drain before more is written to it; a device that cannot keep
up (queue full) is disconnected with close code 4408; it reconnects and syncs, and nobody
else waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
import weakref
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


class _Flusher:
    """The sessions with frames queued since the last turn of the loop, written at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Session] = []

    def add(self, session: Session) -> None:
        if not self._dirty:
            self._loop.call_soon(self._run)
        self._dirty.append(session)

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            session.flush()


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = (
    weakref.WeakKeyDictionary()
)


def _flusher() -> _Flusher:
    loop = asyncio.get_running_loop()
    flusher = _flushers.get(loop)
    if flusher is None:
        flusher = _flushers[loop] = _Flusher(loop)
    return flusher


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
        self._flusher = _flusher()
        self._scheduled = False  # in the flusher's list for this turn
        self._draining: asyncio.Task[None] | None = None  # waiting for the socket to drain
        self._closing = False
        self.frames_out = 0
        # While > 0, events wait in _held (see hold_events); replies still go out.
        self._holds = 0
        self._held: list[bytes] = []

    @property
    def closed(self) -> bool:
        return self._closing or self.ws.closed

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
        if not self._scheduled:
            self._scheduled = True
            self._flusher.add(self)
        return True

    def send(self, data: bytes) -> bool:
        """Queue an encoded JSON payload."""
        return self.send_framed(frame_text(data))

    def send_obj(self, obj: Any) -> bool:
        return self.send(encode(obj))

    def flush(self) -> None:
        """Write what is queued in one transport write (unless the socket is draining)."""
        self._scheduled = False
        queue, transport = self._queue, self.transport
        if not queue or self._draining is not None:
            return
        if transport is None or transport.is_closing():
            queue.clear()
            return
        n = len(queue)
        try:
            transport.write(b"".join(queue))
        except (ConnectionError, RuntimeError):
            queue.clear()
            return
        queue.clear()
        self.frames_out += n
        if transport.get_write_buffer_size() > HIGH_WATER:  # a slow reader
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        transport = self.transport
        try:
            # aiohttp owns the protocol, so its pause/resume_writing are not ours to hook.
            while transport.get_write_buffer_size() > HIGH_WATER and not transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        finally:
            self._draining = None
        self.flush()

    async def _drained(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until what was queued has been handed to the socket."""
        self.flush()
        draining = self._draining
        if draining is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(draining)
            except TimeoutError:
                draining.cancel()
            except asyncio.CancelledError:
                draining.cancel()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we were cancelled (not only the drain, by another waiter)

    def close_soon(self, code: int, message: str) -> None:
        """Flush what is queued, then close with ``code`` (without awaiting here)."""
        if self._closing:
            return
        self._closing = True

        async def _close() -> None:
            await self._drained(2.0)
            await self.ws.close(code=code, message=message.encode())

        asyncio.get_running_loop().create_task(_close())

    async def flush_and_close(self, code: int, message: str) -> None:
        """Close after flushing the queue, and wait for it."""
        self.close_soon(code, message)
        await self._drained(2.0)
        await self.ws.close(code=code, message=message.encode())
