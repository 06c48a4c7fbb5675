"""HTTP routes: demo accounts, ICE servers, health, readiness, metrics, the demo page."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from im_bridge.errors import (
    NotFound,
    RateLimited,
    TalkbridgeError,
    TooLarge,
    Unauthorized,
)
from im_bridge.ids import valid_user_id
from signaling.codec import decode_body, encode
from signaling.ice import ice_ttl
from signaling.keys import STATE
from signaling.login_limits import USER_FAILURE_EVERY_S, client_address
from signaling.state import AppState

WEB_DEMO = Path(__file__).resolve().parent.parent / "web_demo"
# Retry-After on a 429: by then the slower of the login buckets has a token again
RETRY_AFTER_S = math.ceil(USER_FAILURE_EVERY_S)
MAX_BODY = 16_384  # bytes of a JSON request body (/api/register, /api/login)
_STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "unsupported": 400,
    "internal": 500,
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(data), status=status, content_type="application/json")


def _error(err: TalkbridgeError) -> web.Response:
    response = _json({"error": err.to_wire()}, _STATUS.get(err.code, 500))
    if isinstance(err, RateLimited):
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


async def _body(request: web.Request) -> dict[str, Any]:
    too_large = TooLarge(f"request body too large (more than {MAX_BODY} bytes)")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    # A chunked body has no Content-Length: read at most one byte past the limit, whatever
    # the headers say (request.json() would read up to client_max_size, 1 MiB).
    data = bytearray()
    while len(data) <= MAX_BODY:
        chunk = await request.content.read(MAX_BODY + 1 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_BODY:
        raise too_large
    return decode_body(data)


async def _account(request: web.Request, action: str) -> web.Response:
    """``/api/register`` and ``/api/login``: a token for a demo account."""
    state: AppState = request.app[STATE]
    try:
        if not state.demo_accounts:
            raise NotFound("demo accounts are turned off on this server")
        limits = state.login_limits
        address = client_address(
            request.remote or "", request.headers.get("X-Forwarded-For"), limits.proxies
        )
        if not limits.attempt(address):
            raise RateLimited("too many attempts from this address; try again later")
        body = await _body(request)
        if action == "register":
            user = await state.users.register(
                body.get("user"), body.get("password"), body.get("name")
            )
        else:
            uid = body.get("user")
            # Only ids an account can have are counted: others cannot be guessed into, and
            # would let a client fill the limiter with 16 KiB keys.
            counted = uid if valid_user_id(uid) else None
            if counted is not None and not limits.may_log_in(counted):
                raise RateLimited("too many failed logins for this user; try again later")
            try:
                user = await state.users.authenticate(uid, body.get("password"))
            except Unauthorized:
                if counted is not None:
                    limits.failed(counted)
                raise
        token, exp = state.verifier.mint(user.id, name=user.name)
        return _json({"user": user.id, "name": user.name, "token": token, "expires_at": exp})
    except TalkbridgeError as err:
        return _error(err)


async def register(request: web.Request) -> web.Response:
    return await _account(request, "register")


async def login(request: web.Request) -> web.Response:
    return await _account(request, "login")


async def ice_servers(request: web.Request) -> web.Response:
    state: AppState = request.app[STATE]
    try:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("Authorization: Bearer <token> required")
        claims = state.verifier.verify(token.strip())
        return _json({"ice_servers": state.ice_servers(claims.user), "ttl": ice_ttl(state.config)})
    except TalkbridgeError as err:
        return _error(err)


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "time": int(time.time() * 1000)})


async def readyz(request: web.Request) -> web.Response:
    state: AppState = request.app[STATE]
    store_ok = await state.store.ping()
    bus_ok = await state.bus.ping()
    ok = store_ok and bus_ok and not state.extras.get("shutting_down")
    return _json({"ok": ok, "store": store_ok, "bus": bus_ok}, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state: AppState = request.app[STATE]
    state.metrics.store_stats(state.store.stats())
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def index(request: web.Request) -> web.StreamResponse:
    page = WEB_DEMO / "index.html"
    if not page.exists():
        return web.Response(text="talkbridge is running; the demo page is not installed.")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    """Register the HTTP API, the WebSocket endpoint and the demo page's static files."""
    from signaling.gateway import websocket_handler

    app.router.add_get("/ws", websocket_handler)
    app.router.add_post("/api/register", register)
    app.router.add_post("/api/login", login)
    app.router.add_get("/api/ice-servers", ice_servers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    if WEB_DEMO.is_dir():
        app.router.add_static("/", WEB_DEMO, append_version=False)
