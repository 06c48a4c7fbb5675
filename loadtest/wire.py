"""Lean client connections for the load generator: raw aiohttp WebSocket or socket.io.

Deliberately not built on signaling/client.py: a load generator must add as little per-frame
work as possible, so a connection is a socket plus one reader task that hands each decoded
frame to a plain callback (no queues, no futures per request).
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

Frame = dict[str, Any]
Handler = Callable[[Frame], None]

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


class WsConn(Conn):
    """A raw aiohttp WebSocket connection speaking talkbridge's frames."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, user: str, device: str) -> None:
        self.ws = ws
        self.user = user
        self.device = device
        self.handler: Handler = _noop
        self.closed = False
        self.close_code: int | None = None
        self.on_close: Callable[[WsConn], None] | None = None
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the reader task (after ``handler`` is set)."""
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        ws = self.ws
        try:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                    # Looked up per frame: scenarios swap handlers (set-up requests).
                    self.handler(_decode(msg.data))
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    break
        finally:
            self.closed = True
            self.close_code = ws.close_code
            if self.on_close is not None:
                self.on_close(self)

    async def send(self, frame: Frame) -> None:
        """Send one frame."""
        await self.ws.send_str(_encode(frame).decode())

    async def send_text(self, text: str) -> None:
        """Send a pre-encoded frame."""
        await self.ws.send_str(text)

    async def close(self) -> None:
        """Close the socket and wait for the reader to finish."""
        if not self.ws.closed:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(2.0):
                    await self._reader
        self.closed = True


async def connect_ws(
    session: aiohttp.ClientSession,
    target: Target,
    user: str,
    device: str,
    token: str,
    timeout: float = 15.0,
) -> WsConn:
    """Open, authenticate and return a connection whose reader is not yet started."""
    headers = {"Authorization": f"Bearer {token}"} if target.auth == "header" else {}
    try:
        # Bounded: a server that accepts TCP but never upgrades must not stall the run.
        async with asyncio.timeout(timeout):
            ws = await session.ws_connect(
                target.url,
                headers=headers,
                heartbeat=None,
                autoping=True,
                max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            )
    except TimeoutError as exc:
        raise ConnectError("handshake_timeout") from exc
    except aiohttp.WSServerHandshakeError as exc:
        raise ConnectError(f"http_{exc.status}", str(exc)) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ConnectError(type(exc).__name__, str(exc)) from exc
    try:
        if target.auth == "frame":
            await ws.send_str(encode({"type": "auth", "token": token, "device": device}))
        # The first frame must be auth.ok (or the unauthorized error).
        async with asyncio.timeout(timeout):
            msg = await ws.receive()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        await ws.close()
        raise ConnectError("auth_timeout" if isinstance(exc, TimeoutError) else "closed") from exc
    if msg.type is not aiohttp.WSMsgType.TEXT:
        await ws.close()
        raise ConnectError("closed", f"{msg.type!r} before auth.ok")
    first = _decode(msg.data)
    if first.get("type") != "auth.ok":
        await ws.close()
        raise ConnectError(str(first.get("code") or first.get("type") or "auth_failed"))
    return WsConn(ws, user, device)


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
    return await connect_ws(session, target, user, device, token, timeout)
