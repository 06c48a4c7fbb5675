"""The bare relay: aiohttp WebSocket, no storage, forwards ``msg.send`` as ``msg.new``.

Run: ``python -m loadtest.baselines.bare --port 9001 [--secret S]``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

from loadtest.baselines.common import Auth, Relay, auth_ok, error_reply

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _text(frame: dict[str, Any]) -> str:
    return _encode(frame).decode()


def make_app(secret: str, drop_every: int = 0, dup_every: int = 0) -> web.Application:
    """The relay as an aiohttp application serving ``GET /ws`` and ``GET /healthz``.

    ``drop_every``/``dup_every`` inject faults (acknowledge but never deliver, or deliver
    twice, every Nth message) so the load tester's loss and duplicate detection can be
    tested against a real server.
    """
    auth = Auth(secret)
    relay = Relay()
    online: dict[str, set[web.WebSocketResponse]] = {}

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=65536)
        await ws.prepare(request)
        user: str | None = None
        device = "d"
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            user = auth.user_of(header[7:])
            if user is None:
                await ws.send_str(
                    _text({"type": "error", "code": "unauthorized", "message": "bad token"})
                )
                await ws.close(code=4401)
                return ws
            online.setdefault(user, set()).add(ws)
            await ws.send_str(_text(auth_ok(user, device)))
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    frame = _decode(msg.data)
                except msgspec.DecodeError:
                    await ws.send_str(
                        _text({"type": "error", "code": "bad_request", "message": "json"})
                    )
                    continue
                kind = frame.get("type")
                if user is None:
                    if (
                        kind != "auth"
                        or (user := auth.user_of(str(frame.get("token", "")))) is None
                    ):
                        await ws.send_str(
                            _text(
                                {"type": "error", "code": "unauthorized", "message": "auth first"}
                            )
                        )
                        await ws.close(code=4401)
                        return ws
                    device = str(frame.get("device") or "d")
                    online.setdefault(user, set()).add(ws)
                    await ws.send_str(_text(auth_ok(user, device)))
                    continue
                if kind == "msg.send":
                    out = relay.accept(user, device, frame)
                    if out is None:
                        await ws.send_str(_text(error_reply(frame.get("id"), "bad_request")))
                        continue
                    recipient, reply, event = out
                    # Reply first, as talkbridge acks before it fans out.
                    await ws.send_str(_text(reply))
                    n = relay.msg_ids
                    if drop_every and n % drop_every == 0:
                        continue
                    copies = 2 if dup_every and n % dup_every == 0 else 1
                    text = _text(event)
                    for peer in tuple(online.get(recipient, ())):
                        for _ in range(copies):
                            if not peer.closed:
                                await peer.send_str(text)
                    # The sender's other devices get their own message too (multi-device).
                    if recipient != user:
                        for peer in tuple(online.get(user, ())):
                            if peer is not ws and not peer.closed:
                                await peer.send_str(text)
                elif kind == "ping":
                    await ws.send_str('{"type":"pong"}')
                else:
                    await ws.send_str(_text(error_reply(frame.get("id"), "unsupported")))
        finally:
            if user is not None:
                peers = online.get(user)
                if peers is not None:
                    peers.discard(ws)
                    if not peers:
                        del online[user]
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the bare relay until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--secret", default=os.environ.get("TALKBRIDGE_JWT_SECRET", ""))
    parser.add_argument("--drop-every", type=int, default=0, help="fault: never deliver every Nth")
    parser.add_argument("--dup-every", type=int, default=0, help="fault: deliver every Nth twice")
    args = parser.parse_args(argv)
    web.run_app(
        make_app(args.secret, args.drop_every, args.dup_every),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
