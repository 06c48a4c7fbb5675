"""The WebSocket edge: authenticate, then read frames, dispatch requests, send replies.

Requests of one connection run as concurrent tasks (bounded), started in arrival order;
direct handlers (``msg.send``) start at once in the reader (see signaling/dispatch.py).
Sends from one device therefore enter the store's group commit in the order they were
sent. Only an authentication failure closes the socket; every other problem is answered
with an error frame.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from aiohttp import WSMsgType, web

from im_bridge.errors import (
    BadRequest,
    Internal,
    RateLimited,
    TalkbridgeError,
    TooLarge,
    Unauthorized,
    Unsupported,
)
from im_bridge.ids import DEVICE_ID_RE, now_ms
from signaling.auth import Claims
from signaling.codec import decode_frame, encode
from signaling.config import Config
from signaling.dispatch import DIRECT_HANDLERS, HANDLERS, HOLDS_EVENTS, RequestContext
from signaling.keys import STATE
from signaling.ratelimit import TokenBucket
from signaling.session import CLOSE_AUTH_FAILED, Session
from signaling.state import AppState

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64  # concurrent requests per connection before we stop reading


def _error_frame(err: TalkbridgeError, rid: Any = None) -> bytes:
    frame: dict[str, Any] = {"type": "error", **err.to_wire()}
    if rid is not None:
        frame["id"] = rid
    return encode(frame)


def _reply(rid: Any, data: dict[str, Any] | None) -> bytes:
    return encode({"type": "reply", "id": rid, "ok": True, "data": data or {}})


def _reply_error(rid: Any, err: TalkbridgeError) -> bytes:
    return encode({"type": "reply", "id": rid, "ok": False, "error": err.to_wire()})


async def _refuse(ws: web.WebSocketResponse, state: AppState, err: TalkbridgeError) -> None:
    state.metrics.auth_failures.inc()
    try:
        await ws.send_frame(_error_frame(err), WSMsgType.TEXT)
        await ws.close(code=CLOSE_AUTH_FAILED, message=b"unauthorized")
    except ConnectionError:
        pass  # the client left meanwhile: nobody to tell


def _rate_limited(cfg: Config) -> RateLimited:
    return RateLimited(f"more than {cfg.rate_limit:g} frames per second")


def _pick_device(claims: Claims, asked: object) -> str:
    if asked is not None and (not isinstance(asked, str) or not DEVICE_ID_RE.fullmatch(asked)):
        raise Unauthorized("'device' must match [A-Za-z0-9_.:-]{1,64}")
    if claims.device and asked and asked != claims.device:
        raise Unauthorized("the token is bound to another device")
    return (
        claims.device or (asked if isinstance(asked, str) else None) or "d-" + secrets.token_hex(6)
    )


async def _authenticate(
    request: web.Request, ws: web.WebSocketResponse, state: AppState
) -> tuple[Claims, str] | None:
    header = request.headers.get("Authorization", "")
    try:
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthorized("Authorization must be 'Bearer <token>'")
            claims = state.verifier.verify(token.strip())
            asked = request.query.get("device") or request.headers.get("X-Device-Id")
            return claims, _pick_device(claims, asked)
        try:
            # One deadline for the whole wait: receive(timeout=…) restarts its timer at every
            # ping/pong it answers inside, so a pinging client would never be refused.
            # auth_timeout 0 means no deadline, as it always did (0 turns a limit off).
            async with asyncio.timeout(state.config.auth_timeout or None):
                msg = await ws.receive()
        except TimeoutError:
            raise Unauthorized("no auth frame within the time allowed") from None
        if ws.closed or msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return None  # the client left (or broke the protocol) before authenticating
        if msg.type != WSMsgType.TEXT:
            raise Unauthorized("the first frame must be an auth frame")
        if len(msg.data.encode()) > state.config.max_frame:  # the limit is in bytes
            raise Unauthorized("auth frame too large")
        try:
            frame = decode_frame(msg.data)
        except BadRequest as exc:
            raise Unauthorized(f"the first frame must be an auth frame ({exc.message})") from None
        if frame.get("type") != "auth":
            raise Unauthorized('the first frame must be {"type":"auth","token":…}')
        claims = state.verifier.verify(frame.get("token"))
        return claims, _pick_device(claims, frame.get("device"))
    except Unauthorized as err:
        await _refuse(ws, state, err)
        return None


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """``GET /ws``: one device's connection."""
    state: AppState = request.app[STATE]
    cfg = state.config
    # aiohttp closes the socket itself (1009) above max_msg_size; keep that far above our
    # limit so an oversized frame normally gets a `too_large` error and the socket stays.
    ws = web.WebSocketResponse(
        heartbeat=30.0, max_msg_size=max(cfg.max_frame * 16, 1 << 20), compress=False
    )
    await ws.prepare(request)
    auth = await _authenticate(request, ws, state)
    if auth is None:
        return ws
    claims, device = auth
    session = Session(
        ws,
        request.transport,
        claims.user,
        device,
        name=claims.name,
        admin=claims.admin,
        queue_limit=cfg.send_queue,
    )
    session.send_obj(
        {
            "type": "auth.ok",
            "user": claims.user,
            "device": device,
            "session": session.session_id,
            "server_time": now_ms(),
            "ice_servers": state.ice_servers(claims.user),
            "name": session.name,
            "node": cfg.node_id,
        }
    )
    await state.hub.register(session)
    state.metrics.connections.inc()
    try:
        await _read_loop(state, session, ws)
    finally:
        state.metrics.connections.dec()
        await state.hub.unregister(session)
        session.close_soon(1000, "bye")
    return ws


async def _read_loop(state: AppState, session: Session, ws: web.WebSocketResponse) -> None:
    cfg = state.config
    bucket = TokenBucket(cfg.rate_limit, cfg.rate_burst)
    max_frame = cfg.max_frame
    slots = _Window(MAX_IN_FLIGHT)
    ctx = RequestContext(state, session)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            data: str = msg.data
        elif msg.type == WSMsgType.BINARY:
            err: TalkbridgeError = (
                BadRequest("binary frames are not supported; send JSON text")
                if bucket.take()
                else _rate_limited(cfg)
            )
            session.send(_error_frame(err))
            continue
        else:
            break
        # Every frame takes its token as it arrives, before any work on it: a flood of
        # oversized or unparseable frames is limited like a flood of requests. A frame over
        # the limit is not processed; it is only parsed (once) to answer its request id.
        over = not bucket.take()
        # The limit is in UTF-8 bytes; len() counts characters. A str of n characters is at
        # most 4n bytes, so only frames above a quarter of the limit are encoded to measure.
        n = len(data)
        if n > max_frame or (4 * n > max_frame and len(data.encode()) > max_frame):
            err = _rate_limited(cfg) if over else TooLarge(f"frame larger than {max_frame} bytes")
            session.send(_error_frame(err))
            continue
        try:
            frame = decode_frame(data)
        except BadRequest as bad:
            session.send(_error_frame(_rate_limited(cfg) if over else bad))
            continue
        ftype = frame["type"]
        rid = frame.get("id")
        if over:
            limited = _rate_limited(cfg)
            session.send(_reply_error(rid, limited) if _valid_id(rid) else _error_frame(limited))
            continue
        if ftype == "ping":
            session.send(
                encode({"type": "pong", "id": rid} if rid is not None else {"type": "pong"})
            )
            continue
        if not _valid_id(rid):
            session.send(_error_frame(BadRequest("a request needs an 'id' (string or integer)")))
            continue
        direct = DIRECT_HANDLERS.get(ftype)
        fn = HANDLERS.get(ftype) if direct is None else None
        if direct is None and fn is None:
            state.metrics.frame_in("unknown")
            state.metrics.errors.labels("unsupported").inc()
            session.send(_reply_error(rid, Unsupported(f"unknown request type {ftype!r}")))
            continue
        state.metrics.frame_in(ftype)
        if slots.full():
            await slots.wait()
        slots.used += 1
        if direct is not None:
            reply = _Reply(ctx, rid, ftype, slots)
            try:
                direct(ctx, frame, reply)
            except Exception as exc:
                reply.fail(exc)
        elif fn is not None:
            state.spawn(_run(ctx, fn, frame, rid, slots))


class _Window:
    """Requests in flight on one connection; the reader waits while it is full.

    (A plain counter: asyncio.Semaphore costs measurably more per request.)
    """

    __slots__ = ("_free", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._free: asyncio.Event | None = None

    def full(self) -> bool:
        return self.used >= self.limit

    async def wait(self) -> None:
        self._free = asyncio.Event()
        await self._free.wait()

    def release(self) -> None:
        self.used -= 1
        if self._free is not None and self.used < self.limit:
            self._free.set()
            self._free = None


class _Reply:
    """The answer to one request of a direct handler (see signaling/dispatch.py)."""

    __slots__ = ("ctx", "ftype", "rid", "sent", "slots", "t0")

    def __init__(self, ctx: RequestContext, rid: Any, ftype: str, slots: _Window) -> None:
        self.ctx = ctx
        self.rid = rid
        self.ftype = ftype
        self.slots = slots
        self.t0 = time.perf_counter()
        self.sent = False

    def ok(self, data: dict[str, Any] | None) -> None:
        if self._once():
            self.ctx.session.send_reply(_reply(self.rid, data))

    def fail(self, err: BaseException) -> None:
        if self._once(err):
            self.ctx.session.send_reply(_error_reply(self.ctx.state, self.ftype, self.rid, err))

    def _once(self, err: BaseException | None = None) -> bool:
        if self.sent:
            log.error("a second reply to %s %r was dropped", self.ftype, self.rid, exc_info=err)
            return False
        self.sent = True
        self.slots.release()
        self.ctx.state.metrics.request_done(self.ftype, time.perf_counter() - self.t0)
        return True


def _error_reply(state: AppState, ftype: str, rid: Any, err: BaseException) -> bytes:
    """The error reply for what a handler raised (``internal`` for anything unexpected)."""
    if isinstance(err, TalkbridgeError):
        state.metrics.errors.labels(err.code).inc()
        return _reply_error(rid, err)
    log.error("handler for %s failed", ftype, exc_info=err)
    state.metrics.errors.labels("internal").inc()
    return _reply_error(rid, Internal("internal error"))


def _valid_id(rid: Any) -> bool:
    if isinstance(rid, str):
        return 0 < len(rid) <= 128
    return isinstance(rid, int) and not isinstance(rid, bool)


async def _run(
    ctx: RequestContext, fn: Any, frame: dict[str, Any], rid: Any, slots: _Window
) -> None:
    state = ctx.state
    t0 = time.perf_counter()
    holds = frame["type"] in HOLDS_EVENTS
    if holds:
        ctx.session.hold_events()
    try:
        data = await fn(ctx, frame)
        ctx.session.send_reply(_reply(rid, data))
    except Exception as err:
        ctx.session.send_reply(_error_reply(state, frame["type"], rid, err))
    finally:
        if holds:
            ctx.session.release_events()
        slots.release()
        state.metrics.request_done(frame["type"], time.perf_counter() - t0)
