"""Lean client connections for the load generator: WebSocket (picows) or socket.io.

Deliberately not built on signaling/client.py: a load generator must add as little per-frame
work as possible, so a connection hands each decoded frame to a plain callback (no queues,
no futures per request). WebSocket connections use picows, whose frame parser, masking and
transport are compiled: against aiohttp's client (reader task per connection, a wake-up per
frame) the generator's CPU per chat message fell by about a third (loadtest/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec
import picows

Frame = dict[str, Any]
Handler = Callable[[Frame], None]

# The largest frame a connection accepts (group history pages, call offers: far below).
MAX_FRAME_BYTES = 16 * 1024 * 1024

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def encode(frame: Frame) -> str:
    """Encode one frame as the JSON text the protocol carries."""
    return _encode(frame).decode()


class ConnectError(Exception):
    """A connection attempt failed; ``code`` is what the report counts it under."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


@dataclass(frozen=True)
class Target:
    """Where and how clients connect."""

    url: str  # ws://host:port/ws, or http://host:port for socket.io
    transport: str = "ws"  # "ws" | "socketio"
    auth: str = "header"  # "header" (Bearer on the upgrade) | "frame" (first auth frame)

    def socketio_url(self) -> str:
        """The http:// base URL a socket.io client wants."""
        parts = urlsplit(self.url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, "", "", ""))


class Conn:
    """One authenticated device connection; incoming frames go to ``handler``."""

    user: str
    device: str
    handler: Handler
    closed: bool
    closing: bool = False  # set before we close it ourselves: not a server-side drop
    stats: Any = None  # the scenario Stats that counts this connection's errors

    async def send(self, frame: Frame) -> None:
        """Send one frame."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        raise NotImplementedError


def _noop(_frame: Frame) -> None:
    return None


class WsConn(Conn, picows.WSListener):
    """One WebSocket connection speaking talkbridge's frames; picows calls it per frame.

    Frames that arrive before :meth:`start` (the scenario has not set ``handler`` yet) wait
    and are handed over, in order, when it is called.
    """

    def __init__(self, user: str, device: str) -> None:
        self.user = user
        self.device = device
        self.handler: Handler = _noop
        self.closed = False
        self.close_code: int | None = None
        self.on_close: Callable[[WsConn], None] | None = None
        self.transport: picows.WSTransport | None = None
        self._started = False
        self._early: list[Frame] = []
        self._fragments: bytearray | None = None
        self._first: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        """Hand frames to ``handler`` from now on (after it is set), the early ones first."""
        self._started = True
        early, self._early = self._early, []
        for frame in early:
            self.handler(frame)

    # picows's callbacks

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        kind = frame.msg_type
        if kind is picows.WSMsgType.TEXT or kind is picows.WSMsgType.BINARY:
            if not frame.fin:  # the first of a fragmented message
                self._fragments = bytearray(frame.get_payload_as_memoryview())
                return
            self._deliver(_decode(frame.get_payload_as_memoryview()))
        elif kind is picows.WSMsgType.CONTINUATION:
            if self._fragments is None:
                transport.send_close(picows.WSCloseCode.PROTOCOL_ERROR)
                transport.disconnect()
                return
            self._fragments += frame.get_payload_as_memoryview()
            if frame.fin:
                payload, self._fragments = bytes(self._fragments), None
                self._deliver(_decode(payload))
        elif kind is picows.WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code().value)
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self._first.done():
            self._first.set_exception(ConnectionError("closed before auth.ok"))
        if self.closed:
            return
        self.closed = True
        if self.on_close is not None:
            self.on_close(self)

    def _deliver(self, frame: Frame) -> None:
        if self._started:
            self.handler(frame)  # looked up per frame: scenarios swap handlers
        elif not self._first.done():
            self._first.set_result(frame)
        else:
            self._early.append(frame)

    # sending

    def send_bytes_now(self, payload: bytes) -> None:
        """Send one encoded text frame now (picows writes synchronously)."""
        if self.closed or self.transport is None:
            raise ConnectionResetError("connection closed")
        self.transport.send(picows.WSMsgType.TEXT, payload)

    async def send(self, frame: Frame) -> None:
        """Send one frame."""
        self.send_bytes_now(_encode(frame))

    async def send_text(self, text: str) -> None:
        """Send a pre-encoded frame."""
        self.send_bytes_now(text.encode())

    async def close(self) -> None:
        """Close the connection (close handshake, at most 2 s) and mark it closed."""
        transport = self.transport
        if transport is not None and not transport.is_disconnected:
            with contextlib.suppress(Exception):
                transport.send_close(picows.WSCloseCode.OK)
                transport.disconnect()
                async with asyncio.timeout(2.0):
                    await transport.wait_disconnected()
        self.closed = True


async def connect_ws(
    target: Target,
    user: str,
    device: str,
    token: str,
    timeout: float = 15.0,
) -> WsConn:
    """Open, authenticate and return a connection; frames wait until ``start()``."""
    headers = {"Authorization": f"Bearer {token}"} if target.auth == "header" else {}
    try:
        # Bounded: a server that accepts TCP but never upgrades must not stall the run.
        async with asyncio.timeout(timeout):
            transport, conn = await picows.ws_connect(
                lambda: WsConn(user, device),
                target.url,
                extra_headers=headers,
                websocket_handshake_timeout=timeout,
                max_frame_size=MAX_FRAME_BYTES,
            )
    except TimeoutError as exc:
        raise ConnectError("handshake_timeout") from exc
    except picows.WSHandshakeError as exc:
        status = exc.response.status if exc.response is not None else "handshake"
        raise ConnectError(f"http_{status}", str(exc)) from exc
    except (picows.WSError, OSError) as exc:
        raise ConnectError(type(exc).__name__, str(exc)) from exc
    assert isinstance(conn, WsConn) and conn.transport is transport  # on_ws_connected set it
    try:
        if target.auth == "frame":
            conn.send_bytes_now(_encode({"type": "auth", "token": token, "device": device}))
        # The first frame must be auth.ok (or the unauthorized error).
        async with asyncio.timeout(timeout):
            first = await conn._first
    except (TimeoutError, ConnectionError) as exc:
        await conn.close()
        raise ConnectError("auth_timeout" if isinstance(exc, TimeoutError) else "closed") from exc
    if first.get("type") != "auth.ok":
        await conn.close()
        raise ConnectError(str(first.get("code") or first.get("type") or "auth_failed"))
    return conn


class SioConn(Conn):
    """A python-socketio client; frames travel as the payload of the ``frame`` event."""

    def __init__(self, client: Any, user: str, device: str) -> None:
        self.client = client
        self.user = user
        self.device = device
        self.handler: Handler = _noop
        self.closed = False

    def start(self) -> None:
        """Frames are dispatched by socket.io itself; nothing to start."""
        return None

    async def send(self, frame: Frame) -> None:
        """Emit one frame."""
        await self.client.emit("frame", frame)

    async def close(self) -> None:
        """Disconnect."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                await self.client.disconnect()


async def connect_sio(
    session: aiohttp.ClientSession,
    target: Target,
    user: str,
    device: str,
    token: str,
    timeout: float = 15.0,
) -> SioConn:
    """Connect a socket.io client (websocket transport only) and wait for auth.ok."""
    import socketio  # heavy import, only on this path

    client = socketio.AsyncClient(reconnection=False, http_session=session, handle_sigint=False)
    conn = SioConn(client, user, device)
    ready: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()

    def first(frame: Frame) -> None:
        if not ready.done():
            ready.set_result(frame)

    conn.handler = first

    @client.on("frame")  # type: ignore[untyped-decorator]
    def _on_frame(frame: Frame) -> None:
        conn.handler(frame)

    @client.on("disconnect")  # type: ignore[untyped-decorator]
    def _on_disconnect(*_args: Any) -> None:
        conn.closed = True

    try:
        await client.connect(
            target.socketio_url(),
            transports=["websocket"],
            auth={"token": token, "device": device},
            wait_timeout=int(timeout),
        )
        async with asyncio.timeout(timeout):
            reply = await ready
    except Exception as exc:
        with contextlib.suppress(Exception):
            await client.disconnect()
        raise ConnectError("socketio_connect", str(exc)) from exc
    if reply.get("type") != "auth.ok":
        await client.disconnect()
        raise ConnectError(str(reply.get("code") or "auth_failed"))
    return conn


async def connect(
    session: aiohttp.ClientSession,
    target: Target,
    user: str,
    device: str,
    token: str,
    timeout: float = 15.0,
) -> WsConn | SioConn:
    """Connect with the target's transport; the caller sets ``handler`` then calls ``start``."""
    if target.transport == "socketio":
        return await connect_sio(session, target, user, device, token, timeout)
    return await connect_ws(target, user, device, token, timeout)
