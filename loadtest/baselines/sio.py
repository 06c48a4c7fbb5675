"""The python-socketio relay: what a Python team would reach for first.

Frames of talkbridge's protocol travel as the payload of the socket.io event ``frame``;
the token comes in socket.io's ``auth`` object. Each user's devices join a room named
after the user, so ``msg.new`` is an ``emit(..., room=user)``.
Run: ``python -m loadtest.baselines.sio --port 9002 [--secret S]``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import socketio
from aiohttp import web

from loadtest.baselines.common import Auth, Relay, auth_ok, error_reply


def make_app(secret: str) -> web.Application:
    """The relay as an aiohttp application (socket.io under /socket.io/, plus /healthz)."""
    auth = Auth(secret)
    relay = Relay()
    sio = socketio.AsyncServer(async_mode="aiohttp", logger=False, engineio_logger=False)
    sessions: dict[str, tuple[str, str]] = {}

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, _environ: dict[str, Any], auth_data: Any = None) -> bool:
        token = auth_data.get("token", "") if isinstance(auth_data, dict) else ""
        user = auth.user_of(str(token))
        if user is None:
            return False
        device = str(auth_data.get("device") or "d")
        sessions[sid] = (user, device)
        await sio.enter_room(sid, user)
        await sio.emit("frame", auth_ok(user, device), to=sid)
        return True

    @sio.event  # type: ignore[untyped-decorator]
    async def disconnect(sid: str, *_args: Any) -> None:
        sessions.pop(sid, None)

    @sio.on("frame")  # type: ignore[untyped-decorator]
    async def frame(sid: str, data: Any) -> None:
        who = sessions.get(sid)
        if who is None or not isinstance(data, dict):
            return
        user, device = who
        kind = data.get("type")
        if kind == "msg.send":
            out = relay.accept(user, device, data)
            if out is None:
                await sio.emit("frame", error_reply(data.get("id"), "bad_request"), to=sid)
                return
            recipient, reply, event = out
            await sio.emit("frame", reply, to=sid)
            await sio.emit("frame", event, room=recipient)
            if recipient != user:
                # The sender's other devices get their own message too (multi-device).
                await sio.emit("frame", event, room=user, skip_sid=sid)
        elif kind == "ping":
            await sio.emit("frame", {"type": "pong"}, to=sid)
        else:
            await sio.emit("frame", error_reply(data.get("id"), "unsupported"), to=sid)

    app = web.Application()
    sio.attach(app)

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the socket.io relay until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--secret", default=os.environ.get("TALKBRIDGE_JWT_SECRET", ""))
    args = parser.parse_args(argv)
    web.run_app(
        make_app(args.secret),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
